import threading

import pytest

from localcoder.completion import Completer, InfillRequest
from localcoder.engines.base import CancelToken, Sampling
from localcoder.engines.fake import FakeEngine
from localcoder.engines.kvcache import common_prefix_len
from localcoder.errors import InvalidRequest
from localcoder.fim.context import Budget
from localcoder.fim.formats import Snippet


def make(text, **kw):
    eng = FakeEngine(completion=text, **kw)
    return eng, Completer(eng)


def test_single_line_result_and_timings():
    eng, c = make("a + b\nprint('extra')\n")
    r = c.complete(InfillRequest("def add(a, b):\n    return ", "\n", mode="auto"))
    assert (r.text, r.mode, r.stop_type) == ("a + b", "single", "line")
    assert r.timings.prompt_n == r.prompt_tokens > 0 and r.timings.predicted_n >= 6


def test_multi_line_stops_at_the_end_of_the_block():
    _, c = make("    total = sum(xs)\n    return total\n\ndef other():\n    pass\n")
    r = c.complete(InfillRequest("def f(xs):\n", "\n", mode="auto"))
    assert r.mode == "multi" and r.stop_type == "block"
    assert r.text == "    total = sum(xs)\n    return total"


def test_string_scope_ends_a_multi_line_middle_in_a_docstring_with_its_closing_line():
    body = 'Returns the total.\n    """\n    return sum(xs)\n'
    prefix = 'def f(xs):\n    """Add them up.\n\n    '
    eng = FakeEngine(completion=body)
    r = Completer(eng, string_scope=True).complete(InfillRequest(prefix, "\n", mode="multi", max_tokens=200))
    assert (r.text, r.stop_type) == ('Returns the total.\n    """', "string")
    whole = Completer(FakeEngine(completion=body)).complete(  # the default: off
        InfillRequest(prefix, "\n", mode="multi", max_tokens=200))
    assert whole.text == body.rstrip("\n")
    assert r.timings.predicted_n < whole.timings.predicted_n - 10  # generation stopped there, not trimmed after


def test_streamed_deltas_concatenate_to_the_final_text():
    _, c = make("x = 1   \ny = 2\nz = 3\n\n\n")
    s = c.stream(InfillRequest("", "", mode="multi", max_tokens=200))
    pieces = list(s)
    assert "".join(pieces) == s.result.text == "x = 1\ny = 2\nz = 3"
    assert len(pieces) > 1


def test_eos_token_ends_generation():
    _, c = make("pass")
    r = c.complete(InfillRequest("def f():\n    ", "", mode="single"))
    assert (r.text, r.stop_type) == ("pass", "eos")


def test_max_tokens_limit_and_stop_words():
    _, c = make("abcdefghij")
    assert c.complete(InfillRequest("", "", max_tokens=3)).stop_type == "limit"
    r = c.complete(InfillRequest("", "", stop=["def"]))
    assert (r.text, r.stop_type) == ("abc", "word")


def test_kv_prefix_reuse_is_reported_when_the_user_types_more():
    eng, c = make("x")
    c.model_orders = ("spm",)  # a model that declares spm (an adapter trained for it)
    first = c.complete(InfillRequest("import os\n\ndef main():\n    pa", "\n", order="spm"))
    second = c.complete(InfillRequest("import os\n\ndef main():\n    path", "\n", order="spm"))
    assert first.tokens_cached == 0
    assert second.tokens_cached >= first.prompt_tokens - 1  # SPM: only the typed characters are new
    assert second.tokens_evaluated <= 3


def test_psm_order_recomputes_the_suffix_after_a_keystroke():
    eng, c = make("x")
    suffix = "\n\nif __name__ == '__main__':\n    main()\n"
    c.complete(InfillRequest("def main():\n    pa", suffix, order="psm"))
    r = c.complete(InfillRequest("def main():\n    pat", suffix, order="psm"))
    assert r.tokens_evaluated >= len(suffix.encode())  # the whole suffix is after the change


def test_cancellation_stops_the_engine_within_one_token():
    eng, c = make("y" * 500, token_delay_s=0.01)
    cancel = CancelToken()
    s = c.stream(InfillRequest("", "", mode="single", max_tokens=500), cancel)
    threading.Timer(0.1, cancel.cancel).start()
    list(s)
    generated = eng.tokens_generated_total
    assert s.result.stop_type == "cancelled" and 0 < generated < 100
    assert s.result.timings.cancelled


def test_snippets_and_path_go_into_the_prompt_within_budget():
    eng, c = make("x")
    c.budget = Budget(prefix_tokens=1000, suffix_tokens=100, extra_tokens=60)
    c.complete(InfillRequest("a = ", "", snippets=[Snippet("u.py", "def u(): pass"), Snippet("big.py", "z" * 500)],
                             path="main.py"))
    prompt = eng.prompts[-1]
    assert "<|file_sep|>u.py\ndef u(): pass\n" in prompt and "big.py" not in prompt
    assert "<|file_sep|>main.py\n<|fim_prefix|>a = " in prompt


def test_long_prefix_is_cut_at_a_stable_boundary_and_reported():
    eng, c = make("x")
    c.budget = Budget(prefix_tokens=400, suffix_tokens=50, extra_tokens=0)
    lines = [f"line_{i:03d} = {i}\n" for i in range(100)]
    r1 = c.complete(InfillRequest("".join(lines), "tail\n" * 50))
    start1 = eng.prompts[-1].split("<|fim_prefix|>")[1].split("\n")[0]
    r2 = c.complete(InfillRequest("".join(lines) + "x = 1", "tail\n" * 50))
    start2 = eng.prompts[-1].split("<|fim_prefix|>")[1].split("\n")[0]
    assert r1.truncated and r2.truncated
    assert start1 == start2 and start1.startswith("line_")


def test_typing_at_the_end_of_a_long_file_moves_the_window_only_in_coarse_steps():
    eng, c = make("x")
    c.budget = Budget(prefix_tokens=400, suffix_tokens=50, extra_tokens=0)
    head = "".join(f"value_{i:03d} = compute({i})\n" for i in range(60))  # ~1,600 byte tokens
    typed = "".join(f"extra_{i} = {i}\n" for i in range(30))  # ~400 more, typed one character at a time
    prompts = [c.prompt(InfillRequest(head + typed[:n], ""))[0] for n in range(len(typed) + 1)]
    moved = 0
    for a, b in zip(prompts, prompts[1:]):
        # all but the marker after the prefix (PSM, empty suffix) is shared, except where the start moved
        moved += common_prefix_len(a, b) < len(a) - 2
    assert 1 <= moved <= len(typed) // (400 // 4) + 1  # ~ one move per quarter budget typed, not per keystroke
    assert all(len(p) <= 400 + 3 for p in prompts)


@pytest.mark.parametrize("field,kwargs", [
    ("max_tokens", {"max_tokens": -1}), ("mode", {"mode": "sideways"}),
    ("temperature", {"sampling": Sampling(temperature=-1)}), ("top_p", {"sampling": Sampling(top_p=0)}),
])
def test_invalid_requests_name_the_field(field, kwargs):
    _, c = make("x")
    with pytest.raises(InvalidRequest) as err:
        c.complete(InfillRequest("a", "b", **kwargs))
    assert err.value.param == field


def test_raw_prompts_with_fim_markers_are_split_back():
    _, c = make("x")
    assert c.parse_raw_fim("<|fim_prefix|>a = <|fim_suffix|>\nb<|fim_middle|>") == ("a = ", "\nb")
    assert c.parse_raw_fim("plain text") is None


def test_an_order_the_model_was_not_trained_for_is_refused():
    _, c = make("x")
    with pytest.raises(InvalidRequest) as err:
        c.complete(InfillRequest("a", "b", order="spm"))
    assert err.value.param == "fim_order" and "trained for psm only" in str(err.value)
    c.model_orders = ("spm2",)
    assert c.complete(InfillRequest("a", "b", order="spm2")).text == "x"
