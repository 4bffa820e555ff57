"""Token healing at the cursor: back off the token the cursor may split, make the first tokens spell it."""

import numpy as np
import pytest

from localcoder.completion import Completer, InfillRequest
from localcoder.engines.base import GenerationRequest, Sampling
from localcoder.engines.fake import ByteTokenizer, FakeEngine
from localcoder.fim.healing import Heal, back_off, vocab_bytes

WORDS = ("ret", "return", " ", "a")


def test_a_typed_word_is_backed_off_and_the_model_writes_the_whole_token():
    eng = FakeEngine(completion="return a + b\n", words=WORDS)
    r = Completer(eng).complete(InfillRequest("def f():\n    ret", "\n"))
    assert r.text == "urn a + b"  # inserts after the typed `ret`, not `return` again
    assert eng.prompts[-1].startswith("<|fim_prefix|>def f():\n    <|fim_suffix|>")  # `ret` backed off


def test_without_healing_the_same_model_repeats_what_was_typed():
    eng = FakeEngine(completion="return a + b\n", words=WORDS)
    c = Completer(eng)
    c.token_healing = False
    assert c.complete(InfillRequest("def f():\n    ret", "\n")).text == "return a + b"
    assert "    ret<|fim_suffix|>" in eng.prompts[-1]


def test_a_byte_level_vocabulary_never_heals():
    eng = FakeEngine(completion="return a + b\n")
    r = Completer(eng).complete(InfillRequest("def f():\n    ret", "\n"))
    assert "    ret<|fim_suffix|>" in eng.prompts[-1] and r.text == "return a + b"


def test_a_character_split_over_two_tokens_is_backed_off_whole():
    # é is two byte tokens here; the vocabulary has `ét`, so the cursor may split a token
    eng = FakeEngine(completion="été\n", words=(b"\xa9t", "ét"))
    r = Completer(eng).complete(InfillRequest("x = 'caf" + "é", "'\n"))
    assert "x = 'caf<|fim_suffix|>" in eng.prompts[-1]  # both bytes of é, not half of it
    assert r.text == "té" and "\ufffd" not in r.text


def test_the_mask_allows_extensions_and_prefixes_of_what_remains():
    tok = ByteTokenizer(words=WORDS)
    table = vocab_bytes(tok)
    allowed = {tok.token_bytes(i) for i in table.allowed(b"ret")}
    assert allowed == {b"r", b"ret", b"return"}  # start with `ret`, or are a prefix of it
    assert not any(tok.token_bytes(i).startswith(b"<|") for i in table.allowed(b"<"))  # never a special token
    kept, removed = back_off(tok, tok.tokenize("x = ret"))
    assert (tok.decode(kept), removed) == ("x = ", b"ret")


def test_the_constraint_holds_under_sampling_and_is_used_up():
    eng = FakeEngine(completion="zzzz\n", words=WORDS)  # the model wants `z`: healing forces `ret...` first
    tok = eng.tokenizer
    req = GenerationRequest(tokens=tok.tokenize("x"), max_tokens=4, sampling=Sampling(temperature=1.5, seed=3),
                            heal=Heal(vocab_bytes(tok), b"ret"))
    out = b"".join(tok.token_bytes(t) for t in eng.generate(req))
    assert out.startswith(b"ret") and out.endswith(b"z")  # spelled `ret`, then free again


def test_typing_within_a_word_keeps_the_backed_off_prompt_cached():
    eng = FakeEngine(completion="return a\n", words=("r", "re", "ret", "retu", "return"))
    c = Completer(eng)
    suffix = "\n" + "x = 1\n" * 40
    c.complete(InfillRequest("def f():\n    re", suffix))
    second = c.complete(InfillRequest("def f():\n    ret", suffix))
    assert eng.prompts[-1] == eng.prompts[-2]  # the same prompt: PSM re-reads no suffix for this keystroke
    assert second.tokens_evaluated == 1 and second.text == "urn a"


@pytest.mark.parametrize("rest,token,left", [(b"ret", b"r", b"et"), (b"ret", b"return", b""), (b"r", b"ret", b"")])
def test_each_step_consumes_what_its_token_spells(rest, token, left):
    tok = ByteTokenizer(words=WORDS)
    healer = Heal(vocab_bytes(tok), rest).start()
    row = np.full(tok.n_vocab, -5.0, dtype=np.float32)
    want = tok.tokenize(token.decode())[0]
    row[want] = 0.0
    assert healer.choose(row, 0, lambda r: int(np.argmax(r))) == want
    assert healer._rest[1] == left


def test_partial_typing_suite_types_each_line_to_its_points():
    from localcoder.eval.humaneval_infill import load_partial_tasks, program

    cases = load_partial_tasks(5)
    assert len(cases) == 10 and {c.id.rsplit("/", 1)[1] for c in cases} == {"typed0", "typed50"}
    for c in cases:
        line = c.prefix.rsplit("\n", 1)[1] + c.reference
        assert line.strip() and "\n" not in c.reference
        assert program(c, c.reference).count(line + "\n") >= 1  # the typed part + the rest = the masked line
    half = [c for c in cases if c.id.endswith("typed50")]
    assert all(c.prefix.rsplit("\n", 1)[1].strip() for c in half)  # the cursor is inside the line's text
