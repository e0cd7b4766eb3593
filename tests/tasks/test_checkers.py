"""Answer checkers: math_verify, marker:<TEXT>, py:module:function, py:file.py:function."""

import pytest

from opdkit.tasks import get_checker

GARBAGE = ["", "=>", "\x00\xff\ud800", "}}}{{{\\frac{", "$$$$", "\\boxed{", "=> " + "9" * 5000, None, 12]


def test_marker_checker():
    check = get_checker("marker:####")
    assert check("so 36+36 = 72\n#### 72", "72") == 1.0
    assert check("#### 71\n#### 72 \nthanks", "Natalia sold 48+24 = 72 clips.\n#### 72") == 1.0
    assert check("#### 7", "72") == 0.0
    arrow = get_checker("marker:=>")
    assert arrow("7*5-6\n35-6\n29\n=> 29\n", "29") == 1.0 and arrow("=> 29x", "29") == 0.0
    for g in GARBAGE:
        assert check(g, "72") == 0.0 and arrow(g, "29") == 0.0
    with pytest.raises(ValueError, match="non-empty marker"):
        get_checker("marker:")


def test_math_verify_checker():
    check = get_checker("math_verify")
    assert check("The answer is $\\frac{1}{2}$.", "0.5") == 1.0
    assert check("so we get \\boxed{72}", "72") == 1.0
    assert check("so we get \\boxed{71}", "72") == 0.0
    for g in GARBAGE:
        assert check(g, "72") == 0.0
    assert check("72", "\\frac{") == 0.0  # an unparsable reference scores 0, no exception


def test_math_verify_checker_in_a_thread():
    import threading

    check, out = get_checker("math_verify"), []
    t = threading.Thread(target=lambda: out.append(check("\\boxed{72}", "72")))
    t.start()
    t.join()
    assert out == [1.0]


def test_module_function_checker():
    exact = get_checker("py:tests.tasks.checker_helpers:exact_match")
    assert exact(" 72\n", "72") == 1.0 and exact("71", "72") == 0.0
    assert get_checker("py:tests.tasks.checker_helpers:partial_credit")("it is 72", "72") == 0.5
    picky = get_checker("py:tests.tasks.checker_helpers:picky")
    assert picky("72", "72") == 1.0
    for g in GARBAGE:
        assert picky(g, "72") == 0.0  # the user fn raises on garbage: scored 0.0
    with pytest.raises(TypeError, match="must return a bool or a float"):
        get_checker("py:tests.tasks.checker_helpers:bad_return")("a", "b")
    assert get_checker(lambda c, a: c == a)("x", "x") == 1.0


def test_file_checker(tmp_path, monkeypatch):
    (tmp_path / "rewards.py").write_text("def exact(c, a):\n    return c.strip() == a\n")
    monkeypatch.chdir(tmp_path)
    assert get_checker("py:./rewards.py:exact")(" 7 ", "7") == 1.0
    assert get_checker(f"py:{tmp_path / 'rewards.py'}:exact")("8", "7") == 0.0
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"running .*broken.py failed \(RuntimeError: boom\)"):
        get_checker("py:broken.py:f")


def test_a_spec_that_is_not_a_checker_imports_nothing(tmp_path, monkeypatch):
    """'regex:x' (a module name in front of a colon) or a bare 'mod:fn': refused, nothing imported."""
    import sys

    (tmp_path / "trap.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("trap:fn", "regex:x", "exact", "markers", "math_verify:x"):
        with pytest.raises(ValueError, match=r"unknown checker .*math_verify, marker:<TEXT>.*py:<module>:<function>"):
            get_checker(spec)
    assert not (tmp_path / "IMPORTED").exists() and "trap" not in sys.modules
    with pytest.raises(ValueError, match=r"write py:trap:fn \(that imports 'trap'"):
        get_checker("trap:fn")


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("py:tests.tasks.no_such_module:fn", r"no module 'tests.tasks.no_such_module' on the import path"),
        ("py:tests.tasks.checker_helpers:nope", r"module 'tests.tasks.checker_helpers' has no attribute 'nope'"),
        ("py:tests.tasks.checker_helpers:NOT_CALLABLE", r"'NOT_CALLABLE' is not callable"),
        ("py::fn", r"expected py:<module>:<function>"),
        ("py:./no_such_file.py:fn", r"no file .*no_such_file.py"),
        ("exact", r"unknown checker 'exact'.*math_verify.*marker:<TEXT>.*py:<module>:<function>"),
    ],
)
def test_checker_spec_errors(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_checker(spec)


def test_bare_marker_is_the_default_marker_without_shell_metacharacters():
    """`marker` = `marker:=>` (issue #15: unquoted, bash read `checker=marker:=> k=4` as a redirect, leaving
    `marker:=`, which scored a 91% teacher 0.0% without a word)."""
    bare, arrow = get_checker("marker"), get_checker("marker:=>")
    for text, ans in (("1234 => 1234\n", "1234"), ("12 => 13", "12"), ("no marker", "x")):
        assert bare(text, ans) == arrow(text, ans)
    assert bare("1234 => 1234\n", "1234") == 1.0
    assert get_checker("marker:=")("1234 => 1234\n", "1234") == 0.0  # what the shell left of marker:=>


def test_reference_check_and_all_zero_warning():
    """A checker that gives no reference completion credit is named before any compute, with the shell hint."""
    from opdkit.tasks.checkers import all_zero_warning, reference_check

    pairs = [("1234 => 1234\n", "1234"), ("112 => 112\n", "112"), (None, "9")]
    assert reference_check(get_checker("marker:=>"), pairs, "marker:=>") is None
    note = reference_check(get_checker("marker:="), pairs, "marker:=", knob="data.checker")
    assert note.startswith("opdkit: warning: data.checker=marker:= scores 0 on every one of the 2 reference")
    assert "quote the argument" in note and "\n" not in note
    assert reference_check(get_checker("marker:="), [(None, "1")], "marker:=") is None  # nothing to check
    from opdkit.tasks.checkers import credits_references

    assert credits_references(get_checker("marker"), pairs) and not credits_references(get_checker("marker:="), pairs)
    assert not credits_references(get_checker("marker"), [(None, "1")])
    line = all_zero_warning("checker=math_verify", 20)
    assert "every one of the 20 responses scored 0" in line and "check the checker" in line
