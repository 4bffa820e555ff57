"""Token healing with the real Qwen vocabulary and the packaged 0.5B (llama.cpp)."""

import pytest

from localcoder.completion import Completer, InfillRequest
from localcoder.engines.kvcache import common_prefix_len
from localcoder.fim.healing import back_off

pytestmark = pytest.mark.integration


def test_typed_ret_completes_as_urn(llama_engine):
    llama_engine.reset_cache()
    c = Completer(llama_engine)
    r = c.complete(InfillRequest("def add(a, b):\n    ret", "\n\n\nprint(add(1, 2))\n", max_tokens=16))
    assert r.text.startswith("urn"), r.text
    tok = llama_engine.tokenizer
    kept, removed = back_off(tok, tok.tokenize("def add(a, b):\n    ret"))
    assert removed.endswith(b"ret") and tok.tokenize("def add(a, b):\n    ret")[: len(kept)] == kept


def test_a_character_the_vocabulary_splits_is_backed_off_whole(llama_engine):
    tok = llama_engine.tokenizer
    ch = next(c for c in "𝔘𓀀ꙮ𝕏ᚠ" if len(tok.tokenize("s = '" + c)) - len(tok.tokenize("s = '")) >= 2)
    ids = tok.tokenize("s = '" + ch)
    kept, removed = back_off(tok, ids)
    removed.decode("utf-8")  # starts at a character boundary: never half a character
    assert ch.encode("utf-8") in removed or not removed
    llama_engine.reset_cache()
    r = Completer(llama_engine).complete(InfillRequest("s = '" + ch, "'\n", max_tokens=8))
    assert "\ufffd" not in r.text


def test_successive_keystrokes_share_all_but_the_last_tokens(llama_engine):
    c = Completer(llama_engine)
    typed = "def main():\n    result = compute_total(values)"
    prompts = [c.prompt(InfillRequest("import os\n\n" + typed[:n], "\n    return result\n"))[0]
               for n in range(len("def main():\n    "), len(typed) + 1)]
    suf = c.engine.tokenizer.special_token_id("<|fim_suffix|>")
    same = 0
    for a, b in zip(prompts, prompts[1:]):
        # PSM: everything after the prefix's end changes anyway; before it, at most the last 2 tokens do
        assert common_prefix_len(a, b) >= a.index(suf) - 2
        same += a == b
    assert same >= len(prompts) // 3  # typing within a word often leaves the healed prompt unchanged
