import pytest

from localcoder.stops import StopRules, bracket_depth, decide_mode, open_block_closer


@pytest.mark.parametrize("prefix,suffix,mode", [
    ("x = foo(", ")\n", "single"),
    ("    return ", "\n", "single"),
    ("def f(x):\n", "\n", "multi"),
    ("def f(x):", "\n", "multi"),
    ("    ", "\nprint()", "multi"),
    ("value = compute(a, b", ", c)\n", "single"),
])
def test_auto_mode_follows_the_cursor_context(prefix, suffix, mode):
    assert decide_mode(prefix, suffix) == mode


def test_single_line_stops_at_the_end_of_the_first_line_with_content():
    r = StopRules("single", "x = ", "\n")
    assert r.check("compute()\nmore") == (9, "line")
    assert r.check("\n") is None  # nothing yet: a leading newline alone does not end it


def test_multi_line_stops_when_indentation_leaves_the_block():
    prefix = "def f(xs):\n    total = 0\n"
    r = StopRules("multi", prefix, "")
    text = "    for x in xs:\n        total += x\n    return total\ndef g():\n"
    cut, why = r.check(text)
    assert why == "block" and text[:cut] == "    for x in xs:\n        total += x\n    return total"


def test_after_a_block_opener_a_sibling_line_ends_the_block():
    r = StopRules("multi", "class A:\n    def f(self):", "\n")
    text = "\n        return 1\n    def g(self):\n"
    cut, why = r.check(text)
    assert why == "block" and text[:cut] == "\n        return 1"


def test_generation_that_repeats_the_suffix_is_cut():
    r = StopRules("multi", "def f(x):\n    y = x * 2\n", "    return y\n")
    text = "    y += 1\n    return y\n"
    cut, why = r.check(text)
    assert why == "suffix" and text[:cut] == "    y += 1"


def test_closing_bracket_that_the_suffix_already_has_stops_multi_line():
    r = StopRules("multi", "    result = compute(\n", ")\n")
    text = "        a,\n        b)"
    cut, why = r.check(text)
    assert why == "brackets" and text[:cut] == "        a,\n        b"


def test_finish_removes_overlap_with_the_line_suffix_only_when_brackets_say_so():
    r = StopRules("single", "print(", ")")
    assert r.finish("f(x))") == "f(x)"
    assert r.finish("f(x)") == "f(x)"  # balanced: the model relied on the suffix's ')'


def test_stop_words_and_partial_stop_words_are_held_back():
    r = StopRules("multi", "", "", ("\n\n",))
    assert r.check("a\nb\n\nc")[0] == 3
    assert r.visible("a = 1\n") == "a = 1"  # the newline may start a stop word


def test_trailing_whitespace_is_trimmed_on_every_line():
    r = StopRules("multi", "", "")
    assert r.finish("a = 1   \nb = 2  \n\n") == "a = 1\nb = 2"


def test_bracket_depth_ignores_brackets_inside_strings():
    assert bracket_depth("f('(', \")\")") == 0
    assert bracket_depth("a)") == -1


def test_single_line_that_only_repeats_the_next_line_is_dropped():
    r = StopRules("single", "def f(x):\n", "    return x\n")
    assert r.check("    return x\n") == (0, "suffix")
    assert r.check("    return x", final=True) == (0, "suffix")
    assert r.check("    y = x\n") == (9, "line")


def test_a_repeat_of_the_cursor_lines_indentation_is_dropped_once():
    r = StopRules("single", "def f(xs):\n    for x in xs:\n        ", "\n    return xs\n")
    assert r.drop_repeated_indent("    ") == ("    ", False)  # still only whitespace: undecided
    assert r.drop_repeated_indent("        total += x") == ("total += x", True)
    assert r.drop_repeated_indent("total += x") == ("total += x", True)
    assert r.drop_repeated_indent("  x") == ("  x", True)  # other whitespace is the model's own
    typed = StopRules("single", "    return ", "\n")  # text before the cursor: nothing to drop
    assert typed.drop_repeated_indent("        x") == ("        x", True)


def test_the_completer_inserts_a_re_indented_middle_once():
    from localcoder.completion import Completer, InfillRequest
    from localcoder.engines.fake import FakeEngine

    prefix = "def f(xs):\n    for x in xs:\n        "
    engine = FakeEngine(completion="        total += x\n")  # the model wrote the indentation again
    out = Completer(engine, token_healing=False).complete(InfillRequest(prefix, "\n    return xs\n", mode="single"))
    assert out.text == "total += x"
    engine = FakeEngine(completion="total += x\n")
    assert Completer(engine, token_healing=False).complete(
        InfillRequest(prefix, "\n    return xs\n", mode="single")).text == "total += x"


@pytest.mark.parametrize("prefix,closer", [
    ('def f():\n    """Sum the\n    ', '"""'),
    ("def f():\n    '''Sum the\n    ", "'''"),
    ('def f():\n    """Done."""\n    ', ""),
    ('x = """a' + "'''" + 'b"""\n', ""),  # the other quote inside a string opens nothing
    ('s = """' + "'''" + '\n', '"""'),
    ("/**\n * Adds two numbers.\n * ", "*/"),
    ("/* one */\nint x;\n", ""),
    ('paths = glob("src/**/*.py")\n', ""),  # "/*" inside a line is not a comment opener
])
def test_the_string_or_comment_the_cursor_is_in(prefix, closer):
    assert open_block_closer(prefix) == closer


def test_inside_a_docstring_a_multi_line_middle_ends_with_the_closing_line():
    prefix = 'class W:\n    def wrap(self, text):\n        """Wrap text.\n\n        '
    r = StopRules("multi", prefix, "\n        return []\n", string_scope=True)
    text = 'Chunks are split at spaces.\n        """\n        if self.width <= 0:\n'
    cut, why = r.check(text)
    assert why == "string" and text[:cut] == 'Chunks are split at spaces.\n        """'
    assert r.check('Chunks are split at spaces.\n        """') is None  # the closing line may still grow
    # in code, a docstring the middle writes is not a reason to stop
    code = StopRules("multi", "def f(x):\n", "", string_scope=True)
    assert code.check('    """Double x."""\n    return 2 * x\n') is None


def test_inside_a_block_comment_a_multi_line_middle_ends_with_the_closing_line():
    r = StopRules("multi", "/*\nAdds two numbers.\n", "int add(int a, int b);\n", string_scope=True)
    text = "Returns the sum.\n*/\nint add(int a, int b) {\n"  # no dedent to end it
    cut, why = r.check(text)
    assert why == "string" and text[:cut] == "Returns the sum.\n*/"
