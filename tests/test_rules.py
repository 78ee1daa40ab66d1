"""The rule language: mercure's documented behaviour, the limits, and sandbox escapes refused."""

from __future__ import annotations

from typing import Any

import pytest

from common.rules import (
    MAX_DEPTH,
    MAX_RULE_LENGTH,
    RuleError,
    compile_rule,
    evaluate_completion_series,
    evaluate_rule,
    validate_completion_series,
    validate_rule,
)

TAGS = {
    "Modality": "CT",
    "SeriesDescription": "Head AXIAL 2mm",
    "StudyDescription": "CT HEAD w/o contrast",
    "SliceThickness": "1.5",
    "PatientAge": "064Y",
    "ImageOrientationPatient": "1\\0\\0\\0\\1\\0",
    "SenderAET": "CT01",
    "ManufacturerModelName": "Trio",
}


# ---------------------------------------------------------------------------- mercure §3.4

MERCURE_CASES: list[tuple[str, bool]] = [
    ('tags.Modality == "CT"', True),
    ('tags.Modality == "MR"', False),
    ('tags["Modality"] == "CT"', True),
    ("tags.modality == 'CT'", True),  # attribute access falls back to a case-insensitive match
    ("tags.MODALITY == 'CT'", True),
    ('@Modality@ == "CT"', True),
    ("float(tags.SliceThickness) < 2", True),
    ("float(tags.SliceThickness) < 1", False),
    ('"head" in tags.StudyDescription.lower()', True),
    ('"HEAD" in tags.StudyDescription', True),
    ('"spine" in tags.StudyDescription.lower()', False),
    ('tags.SeriesDescription.startswith("Head") and tags.Modality == "CT"', True),
    ('tags.SeriesDescription.endswith("2mm") or tags.Modality == "MR"', True),
    ('not tags.Modality == "MR"', True),
    ('tags.Modality in ("CT", "PT")', True),
    ('tags.Modality not in ["CT", "PT"]', False),
    ("1 < float(tags.SliceThickness) <= 1.5", True),  # chained comparison
    ("int(tags.PatientAge[:3]) >= 18", True),
    ("len(tags.ImageOrientationPatient.split('\\\\')) == 6", True),
    ("abs(float(tags.ImageOrientationPatient.split('\\\\')[0])) > 0.9", True),
    ("('Tr' in @ManufacturerModelName@) | (@ManufacturerModelName@ == 'Trio')", True),
    ("True", True),
    ("False", False),
    ("tags.SliceThickness", True),  # truthiness decides: a non-empty string
    ('""', False),
    ("0", False),
    ("sqrt(16) == 4 and floor(2.7) == 2 and ceil(2.1) == 3", True),
    ("round(pi, 2) == 3.14 and e > 2.7", True),
    ("max(map(float, tags.ImageOrientationPatient.split('\\\\'))) == 1", True),
    ("sorted(['b', 'a'], reverse=True)[0] == 'b'", True),
    ("any(word in tags.SeriesDescription.lower() for word in ('axial', 'sag'))", True),
    ("all(x.isdigit() for x in tags.ImageOrientationPatient.split('\\\\'))", True),
    ("[x for x in range(5) if x % 2] == [1, 3]", True),
    ("{k: v for k, v in zip('ab', (1, 2))} == dict(a=1, b=2)", True),
    ("'CT' if tags.Modality == 'CT' else ''", True),
    ('f"{tags.Modality}-{float(tags.SliceThickness):.1f}" == "CT-1.5"', True),
    ('"{0}/{1:>3}".format(tags.Modality, 7) == "CT/  7"', True),
    ("format(2.5, '.2f') == '2.50'", True),
    ("hex(255) == '0xff' and bin(2) == '0b10' and oct(8) == '0o10'", True),
    ("chr(ord('a') + 1) == 'b' and divmod(7, 2) == (3, 1) and pow(2, 10) == 1024", True),
    ("2 ** 10 == 1024 and 7 // 2 == 3 and 7 % 2 == 1 and 7 / 2 == 3.5", True),
    ("isnan(float('nan')) and isinf(float('inf')) and factorial(5) == 120", True),
    ("list(reversed('abc')) == ['c', 'b', 'a'] and list(enumerate('a')) == [(0, 'a')]", True),
    ("sum(range(5)) == 10 and min(3, 1) == 1 and len(set('aab')) == 2", True),
    ("list(filter(None, [0, 1, '', 'x'])) == [1, 'x']", True),
    ("tags.StudyDescription.split()[0].upper().strip() == 'CT'", True),
    ("tags.SeriesDescription.replace(' ', '_').find('AXIAL') == 5", True),
    ("'Modality' in tags and 'Nope' not in tags", True),  # presence test, no tag read
    ('tags.Modality == "CT"  # a comment', True),
    (r'"\d" == "\\d"', True),  # an invalid escape stays as written, whatever the warning filters
    ('tags.Modality == "CT"\nand tags.SenderAET == "CT01"', True),  # a rule over several lines
]


@pytest.mark.parametrize(("rule", "expected"), MERCURE_CASES)
def test_rule_follows_mercure_semantics(rule: str, expected: bool) -> None:
    result = evaluate_rule(rule, TAGS)
    assert result.error is None, result.error
    assert result.triggered is expected


@pytest.mark.parametrize(
    "rule",
    [
        'tags.BodyPartExamined == "HEAD"',
        'tags["BodyPartExamined"] == "HEAD"',
        'tags["modality"] == "CT"',  # item access is exact, as in mercure
        "@BodyPartExamined@ == 'HEAD'",
        "'HEAD' in tags.bodypartexamined.upper()",
        'tags.get("Modality") == "CT"',  # every attribute of tags is a tag name (mercure)
    ],
)
def test_missing_tag_makes_the_rule_false_not_an_error(rule: str) -> None:
    result = evaluate_rule(rule, TAGS)
    assert result.triggered is False
    assert result.error is None
    assert result.missing_tag is not None


def test_unreplaced_macro_makes_the_whole_rule_false_as_in_mercure() -> None:
    # mercure leaves "@X@" in the text when X is missing, which is a syntax error -> tag not found
    result = evaluate_rule('tags.Modality == "CT" or @BodyPartExamined@ == "HEAD"', TAGS)
    assert (result.triggered, result.missing_tag, result.error) == (False, "BodyPartExamined", None)


def test_short_circuit_skips_a_missing_tag_like_python() -> None:
    result = evaluate_rule('tags.Modality == "CT" or tags.BodyPartExamined == "HEAD"', TAGS)
    assert result.triggered is True
    assert result.tags_accessed == ["Modality"]


def test_macro_inside_a_string_literal_is_text() -> None:
    result = evaluate_rule("'@Modality@' == '@' + 'Modality@'", TAGS)
    assert result.triggered is True
    assert result.tags_accessed == []


def test_exact_tag_name_wins_over_case_insensitive_match() -> None:
    tags = {"modality": "lower", "Modality": "exact"}
    assert evaluate_rule("tags.Modality", tags).value == "exact"
    assert evaluate_rule("tags.MODALITY", tags).value == "lower"  # first in tag order


def test_tags_accessed_lists_each_tag_once_in_order_of_first_read() -> None:
    result = evaluate_rule(
        "tags.modality == 'CT' and @SliceThickness@ and tags.Modality and tags['SenderAET']", TAGS
    )
    assert result.triggered is True
    assert result.tags_accessed == ["Modality", "SliceThickness", "SenderAET"]


def test_result_value_is_the_raw_result_for_the_rule_tester() -> None:
    assert evaluate_rule("tags.SeriesDescription.lower()", TAGS).value == "head axial 2mm"
    assert evaluate_rule("float(tags.SliceThickness) * 2", TAGS).value == 3.0
    assert evaluate_rule("(x for x in 'ab')", TAGS).value == "<generator>"
    assert evaluate_rule("len", TAGS).value == "<function len>"


def test_tag_values_are_read_as_strings() -> None:
    result = evaluate_rule("tags.Rows + 'px'", {"Rows": 512})  # type: ignore[dict-item]
    assert result.value == "512px"


def test_compiled_rule_is_reusable_across_series() -> None:
    rule = compile_rule('tags.Modality == "CT"')
    assert rule.evaluate({"Modality": "CT"}).triggered is True
    assert rule.evaluate({"Modality": "MR"}).triggered is False
    assert rule.evaluate({}).missing_tag == "Modality"


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("int(tags.SeriesDescription)", "ValueError in `int(tags.SeriesDescription)`"),
        ("1 / 0", "ZeroDivisionError in `1 / 0`"),
        ("tags.Modality + 1", "TypeError in `tags.Modality + 1`"),
        ("max([])", "max() arg is an empty sequence"),
        ("[1, 2][5]", "IndexError"),
        ("{'a': 1}['b']", "KeyError"),
        ("'ab'.split('')", "ValueError in `'ab'.split('')`: empty separator"),
        ("tags.Modality.nope()", "'.nope' is not an allowed method"),
        ("(1).lower()", "int has no method '.lower'"),
        ("len[0]", "a function cannot be indexed"),
        ("tags.Modality()", "is not a function"),
        ("'%s' % tags.Modality", "%-formatting"),
        ("sum(['a', 'b'], '')", "sum() adds numbers only"),
        ("sorted([2, 1], key=tags.Modality)", "the key of sorted() must be one of the rule"),
    ],
)
def test_failing_rule_is_false_with_a_precise_error(rule: str, message: str) -> None:
    result = evaluate_rule(rule, TAGS)
    assert result.triggered is False
    assert result.error is not None
    assert message in result.error


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("tags.Modality ==", "syntax error at column"),
        ("", "the rule is empty"),
        ("   ", "the rule is empty"),
        ("modality == 'CT'", "unknown name 'modality'; a tag is read as tags.modality"),
        ('tags.Modality == "CT" and', "syntax error"),
        ("1j", "complex literals are not allowed"),
        ("b'x'", "bytes literals are not allowed"),
        ("tags.Modality @ 2", "the @ operator is not allowed"),
        ("1 << 4", "bit shifts are not allowed"),
        ("[*tags]", "unpacking with * is not allowed"),
        ("dict(**{'a': 1})", "unpacking with ** is not allowed"),
        ("[x for tags.x in 'ab']", "a comprehension may only assign to names"),
        ("x", "unknown name 'x'"),
        ("print(1)", "'print' is not available in rules"),
    ],
)
def test_invalid_rule_is_reported_without_evaluating(rule: str, message: str) -> None:
    problem = validate_rule(rule)
    assert problem is not None
    assert message in problem
    result = evaluate_rule(rule, TAGS)
    assert result.triggered is False
    assert result.error == f"invalid rule: {problem}"


@pytest.mark.parametrize("rule", [rule for rule, _ in MERCURE_CASES])
def test_valid_rules_validate(rule: str) -> None:
    assert validate_rule(rule) is None


def test_compile_rule_raises_rule_error() -> None:
    with pytest.raises(RuleError, match="syntax error"):
        compile_rule("tags.Modality ==")
    with pytest.raises(RuleError, match="must be text"):
        compile_rule(42)  # type: ignore[arg-type]


def test_function_taken_out_of_an_evaluation_cannot_be_called() -> None:
    value = evaluate_rule("[len]", TAGS).value
    assert isinstance(value, list)
    with pytest.raises(RuleError, match="only be called while a rule is evaluated"):
        value[0]("abc")


# ---------------------------------------------------------------------------- escapes and limits

ESCAPES: list[tuple[str, str]] = [
    ("__import__('os')", "names starting with '_'"),
    ("__builtins__", "names starting with '_'"),
    ("().__class__.__bases__[0].__subclasses__()", "attributes starting with '_'"),
    ("tags.__dict__", "attributes starting with '_'"),
    ("tags._tags", "attributes starting with '_'"),
    ('"".join.__self__', "attributes starting with '_'"),
    ("len.__globals__", "attributes starting with '_'"),
    ("sorted.__call__.__globals__['__builtins__']", "attributes starting with '_'"),
    ("(x for x in []).gi_frame.f_globals", "'.f_globals' is not an allowed method"),
    ("(x for x in []).gi_frame", "'.gi_frame' is not an allowed method"),
    ("len.func_globals", "'.func_globals' is not an allowed method"),
    ("'abc'.format_map({})", "'.format_map' is not an allowed method"),
    ("'abc'.encode()", "'.encode' is not an allowed method"),
    ("getattr(tags, '_tags')", "'getattr' is not available"),
    ("eval('1')", "'eval' is not available"),
    ("exec('1')", "'exec' is not available"),
    ("compile('1', '', 'eval')", "'compile' is not available"),
    ("open('/etc/passwd')", "'open' is not available"),
    ("type(tags)", "'type' is not available"),
    ("vars(tags)", "'vars' is not available"),
    ("globals()", "'globals' is not available"),
    ("locals()", "'locals' is not available"),
    ("lambda: 1", "lambda expressions are not allowed"),
    ("list(map(lambda x: x, [1]))", "lambda expressions are not allowed"),
    ("(y := 1)", "assignment expressions (:=) are not allowed"),
    ("[y := 1 for x in 'a']", "assignment expressions (:=) are not allowed"),
    ("f'{tags.__class__}'", "attributes starting with '_'"),
    ("f'{len.__globals__!r:>10}'", "attributes starting with '_'"),
    ("'{0.__class__}'.format(1)", "format fields with attribute or index access"),
    ("'{0.__class__.__init__.__globals__}'.format(len)", "format fields with attribute"),
    ("'{0[0]}'.format([1])", "format fields with attribute or index access"),
    ("'{:>{w}}'.format(1, w=5)", "nested fields in a format specification"),
    ("format(1, '>1000000000')", "a width or precision above 1000"),
    ("f'{1:>1000000000}'", "a width or precision above 1000"),
    ("f'{1:>{10**9}}'", "a width or precision above 1000"),
    ("'{:.99999}'.format(1.5)", "a width or precision above 1000"),
    ("9**9**9", "the result of ** would exceed"),
    ("10 ** 10 ** 10", "the result of ** would exceed"),
    ("pow(2, 10**6)", "the result of ** would exceed"),
    ("2 ** 5000", "the result of ** would exceed"),
    ("int('9' * 4000) * int('9' * 4000)", "an integer of more than 4,096 bits"),
    ("'a' * 10**10", "repeating a string would exceed the limit of 1,000,000 characters"),
    ("10**10 * 'a'", "repeating a string"),
    ("'a' * 10**1000", "repeating a string"),
    ("[0] * 10**9", "repeating a sequence would exceed the limit of 1,000,000"),
    ("[[0] * 1000] * 1000", "repeating a sequence"),
    ("('a' * 999999 + 'b') * 2", "repeating a string"),
    ("'x'.join('a' * 999999 for i in range(2))", "join() would exceed"),
    ("('a' * 1000).replace('a', 'b' * 10000)", "replace() would exceed"),
    ("'a'.center(10**9)", "a width above 1,000,000"),
    ("'1'.zfill(10**9)", "a width above 1,000,000"),
    ("range(10**12)", "range() with more than 100,000 elements"),
    ("list(range(10**100))", "range() with more than 100,000 elements"),
    ("factorial(10**6)", "factorial() of more than 500"),
    ("round(5, -10**9)", "round() to more than 1000 digits"),
    ("sum(1 for a in range(10**5) for b in range(10**5))", "time limit"),
    ("any(x == -1 for x in range(10**5) for y in range(10**5))", "time limit"),
    ("max(range(10**5), key=lambda x: x)", "lambda expressions are not allowed"),
    ("not " * 2400 + "1", f"nested too deeply (more than {MAX_DEPTH} levels)"),
    ("-" * 2400 + "1", "nested too deeply"),
    ("1" + "+1" * 2400, "nested too deeply"),
    ("tags.x" + ".lower()" * 600, "nested too deeply"),
    ("(" * 4000 + "1" + ")" * 4000, "too many nested parentheses"),
    ("[" * 4000 + "]" * 4000, "too many nested parentheses"),
    ("-" * 9999 + "1", "nested too deeply"),
    ("1" + "+1" * 4999, "nested too deeply"),
    ("x" * (MAX_RULE_LENGTH + 1), f"longer than {MAX_RULE_LENGTH:,} characters"),
    ("1," * 4999 + "1", "too long (more than 5,000 elements)"),
    ("1" * 5000, "syntax error"),  # an integer literal beyond Python's conversion limit
    ("1\x00", "syntax error"),
    ("await tags", "await is not allowed"),
    ("[x async for x in tags]", "async comprehensions are not allowed"),
    ("(yield)", "yield is not allowed"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("rule", "message"), ESCAPES)
def test_escape_attempt_is_refused(rule: str, message: str) -> None:
    result = evaluate_rule(rule, TAGS)
    assert result.triggered is False
    assert result.error is not None
    assert message in result.error


# Refused after some work, when a result turns out too large: evaluated with a generous time
# limit so that the size check, not the clock, is what refuses them on a slow machine too.
SIZE_LIMITS: list[tuple[str, str]] = [
    ("'a' * 999999 + 'b' * 999999", "a string of 1,999,998 characters exceeds"),
    ("['a' * 999999, 'b' * 999999]", "larger than the limit of 1,000,000"),
    ("[[0] * 1000 for x in range(1000)]", "larger than the limit of 1,000,000"),
    ("[str(x) * 1000 for x in range(2000)]", "larger than the limit of 1,000,000"),
    ("[1 for a in range(10**5) for b in range(10**5)]", "more than 100,000 elements"),
    ("{a: 'x' * 1000 for a in range(2000)}", "larger than the limit of 1,000,000"),
    ("str(list(range(10**5))) * 2", "repeating a string"),
    ("list(range(10**5)) + list(range(10**5))", "larger than the limit of 1,000,000"),
    ("int('9' * 1300) ** 4", "an integer of more than 4,096 bits"),
    # each value within the limits, but together they would hold gigabytes
    ("len([('a' * 1000) * 1000 for x in range(10**5)])", "in total"),
    ("list(map('x'.center, range(900000, 1000000)))", "in total"),
    ("len(list(('a' * 999999)[1:] for x in range(10**5)))", "in total"),
    ("''.join(str(x) * 999 for x in range(10**5))", "in total"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("rule", "message"), SIZE_LIMITS)
def test_oversized_result_is_refused(rule: str, message: str) -> None:
    result = evaluate_rule(rule, TAGS, time_limit=30)
    assert result.triggered is False
    assert result.error is not None
    assert message in result.error


def test_format_template_taken_from_a_tag_is_guarded_too() -> None:
    tags = {"SeriesDescription": "{0.__class__.__init__.__globals__}"}
    result = evaluate_rule("tags.SeriesDescription.format(1)", tags)
    assert result.error is not None
    assert "format fields with attribute or index access" in result.error


@pytest.mark.timeout(10)
def test_time_limit_is_configurable() -> None:
    rule = "sum(1 for a in range(10**5) for b in range(10**5))"
    result = evaluate_rule(rule, TAGS, time_limit=0.01)
    assert result.error == "the rule took longer than its time limit of 0.01 s"


def test_rules_cannot_change_shared_state() -> None:
    # no mutating method exists: lists offer count/index only, dicts get/keys/values/items
    for rule in ("[1].append(2)", "{}.update(a=1)", "{1}.add(2)", "[2, 1].sort()"):
        assert validate_rule(rule) is not None


# ---------------------------------------------------------------------------- study completion

RECEIVED = ["Axial T2 FS", "SAG T1 TSE", "localizer"]


@pytest.mark.parametrize(
    ("expression", "received", "complete"),
    [
        ("'Axial T2' and ('Sag T1 GRE' or 'Sag T1 TSE')", RECEIVED, True),
        ("'Axial T2' and 'Sag T1 GRE'", RECEIVED, False),
        ("'axial t2'", RECEIVED, True),  # case-insensitive
        ("'T2'", RECEIVED, True),  # substring
        ("'COR'", RECEIVED, False),
        ("'SAG' or ('COR' and 'AX')", ["AX T2", "T1-COR", "T2"], True),  # mercure's own example
        ("'SAG' or 'COR' and 'MISSING'", ["SAG"], True),  # and binds tighter than or
        ("('SAG' or 'COR') and 'MISSING'", ["SAG"], False),
        ("'a' AND 'b'", ["ab"], True),  # mercure's evaluator lower-cases the keywords too
        ("'Axial T2'", [], False),  # nothing received is never complete
        ("", ["anything"], True),  # no requirement: complete once a series arrived
    ],
)
def test_completion_series_follows_mercure(
    expression: str, received: list[str], complete: bool
) -> None:
    assert evaluate_completion_series(expression, received) is complete


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "Value cannot be empty"),
        ('"Axial T2"', "Series names must be enclosed by '...'"),
        ("Axial", "Series names must be enclosed by '...'"),
        ("'Axial T2", "Series names not properly enclosed by '...'"),
        ("'Axial' not 'Sag'", "Invalid entry 'not'"),
        ("'Axial' + 'Sag'", "Invalid entry '+'"),
        ("'Axial' and", "expected a series name or '(' but found the end"),
        ("('Axial' or 'Sag'", "a '(' is not closed"),
        ("'Axial' 'Sag'", "unexpected 'Sag'"),
        ("'a' or " * 10 + "(" * 60 + "'a'" + ")" * 60, "nested too deeply"),
    ],
)
def test_invalid_completion_series_is_reported(expression: str, message: str) -> None:
    problem = validate_completion_series(expression)
    assert problem is not None
    assert message in problem


def test_invalid_completion_series_raises_when_evaluated() -> None:
    with pytest.raises(RuleError, match="Invalid entry"):
        evaluate_completion_series("'Axial' xor 'Sag'", RECEIVED)


@pytest.mark.parametrize(
    "expression", ["'Axial T2' and ('Sag T1 GRE' or 'Sag T1 TSE')", "'a'", "('a')", "'a' or 'b'"]
)
def test_valid_completion_series_validates(expression: str) -> None:
    assert validate_completion_series(expression) is None


def _value(rule: str) -> Any:
    result = evaluate_rule(rule, TAGS)
    assert result.error is None, result.error
    return result.value


def test_string_methods_behave_as_in_python() -> None:
    assert _value("tags.Modality.lower()") == "ct"
    assert _value("' x '.strip()") == "x"
    assert _value("'a,b'.split(',')") == ["a", "b"]
    assert _value("'abcabc'.count('b')") == 2
    assert _value("'12'.isdigit()") is True
    assert _value("'-'.join(['a', 'b'])") == "a-b"
    assert _value("'ab'.center(4, '*')") == "*ab*"
    assert _value("{'a': 1}.get('b', 2)") == 2
    assert _value("sorted({'b': 1, 'a': 2}.items())") == [("a", 2), ("b", 1)]
    assert _value("[1, 2, 2].count(2)") == 2
