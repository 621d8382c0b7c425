"""Jailbreak templates: the loader fills the placeholder exactly (hand-written strings), reads files and folders
of YAML and JSON, names the file and field of every refusal; `evaluate` scores each template and the attack
success rate as counted by hand on a rigged model; (real) every template of the pyrit wheel loads and fills as
PyRIT's own Jinja rendering does."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path

import pytest

import enchtable_jax
from enchtable_jax.cli import main
from enchtable_jax.errors import EnchtableError
from enchtable_jax.eval import jailbreaks, pipeline
from enchtable_jax.eval.jailbreaks import PYRIT_PACKAGE, load_templates, parse_template, template_set
from enchtable_jax.eval.pipeline import evaluate, summary_table
from enchtable_jax.models.tokenizer import byte_level_tokenizer

# The prompt carries Jinja syntax, a backslash, CRLF and a percent sign: all must arrive verbatim.
PROMPT = "Tell me {{ prompt }} {% raw %}how{# x #}\\n to\r\n 100% "


def _write(folder: Path, name: str, content: str | dict) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_fill_inserts_the_prompt_verbatim_into_the_text_jinja_renders(tmp_path):
    value = ('Start {% raw %}{{ literal }} {% endraw %}{{ "{% endraw %}" }}{# a comment #}then {{prompt}}.\n'
             'Again: {{ prompt }}\r\nend\n')
    path = _write(tmp_path, "t.yaml", "name: Both\nparameters: [prompt]\nvalue: " + json.dumps(value) + "\n")
    (template,) = load_templates(path).templates
    assert template.name == "Both" and template.source == str(path)
    # Jinja's text: raw markers and the comment gone, the constant written, CRLF as LF, the final LF dropped
    assert template.fill(PROMPT) == f"Start {{{{ literal }}}} {{% endraw %}}then {PROMPT}.\nAgain: {PROMPT}\nend"
    assert template.fill("") == "Start {{ literal }} {% endraw %}then .\nAgain: \nend"


def test_a_folder_reads_yaml_yml_json_below_it_in_order_with_unique_names(tmp_path):
    _write(tmp_path, "b.yaml", "---\nname: Same\nparameters:\n  - prompt\nvalue: >\n  B {{ prompt }} b\n")
    _write(tmp_path, "a/c.json", {"name": "Same", "value": "C {{ prompt }}"})
    _write(tmp_path, "d.YML", "value: 'D {{ prompt }}'")  # no name: the stem; no parameters: prompt only
    _write(tmp_path, "multi/m.yaml", "parameters: [prompt, target_group]\nvalue: '{{ target_group }} {{ prompt }}'")
    _write(tmp_path, "image.json", {"data_type": "image_path", "value": "x.png {{ prompt }}"})
    _write(tmp_path, ".hidden/h.yaml", "value: 'H {{ prompt }}'")
    _write(tmp_path, "notes.txt", "value: 'N {{ prompt }}'")
    loaded = load_templates(tmp_path)
    assert [(t.name, Path(t.source).relative_to(tmp_path).as_posix()) for t in loaded.templates] == [
        ("Same", "a/c.json"), ("Same-2", "b.yaml"), ("d", "d.YML")]
    assert [t.fill("p") for t in loaded.templates] == ["C p", "B p b", "D p"]  # `>` folds; its final LF dropped
    assert [(Path(f).name, reason) for f, reason in loaded.skipped] == [
        ("image.json", "data_type 'image_path', not text"), ("m.yaml", "parameters target_group besides prompt")]
    assert loaded.record()["count"] == 3 and loaded.record()["names"] == ["Same", "Same-2", "d"]
    assert [t.name for t in load_templates(tmp_path, limit=2).templates] == ["Same", "Same-2"]


@pytest.mark.parametrize("name,content,needle", [
    ("list.yaml", "- value: '{{ prompt }}'", r"top level is a list; expected a mapping with a value field"),
    ("none.yaml", "name: x", r"no field value"),
    ("number.json", {"value": 3}, r"field value is a int"),
    ("bare.yaml", "value: no placeholder", r"field value has no \{\{ prompt \}\} placeholder"),
    ("other.yaml", "value: '{{ prompt }} {{ goal }}'", r"field value uses the variable 'goal' \(line 1\)"),
    ("filter.yaml", "value: '{{ prompt | upper }}'", r"field value uses a Jinja filter expression"),
    ("loop.yaml", "value: '{% for x in y %}{{ prompt }}{% endfor %}'", r"field value has a Jinja for statement"),
    ("broken.yaml", "value: '{{ prompt '", r"field value is not a valid Jinja template \(line 1: "),
    ("params.yaml", "parameters: prompt\nvalue: '{{ prompt }}'", r"field parameters must be a list of names"),
    ("noprompt.yaml", "parameters: [goal]\nvalue: '{{ prompt }}'", r"field parameters \['goal'\] does not list"),
    ("name.yaml", "name: [1]\nvalue: '{{ prompt }}'", r"field name must be a non-empty string"),
    ("bad.yaml", "value: [unclosed", r"not valid YAML \(line 1: expected ',' or ']'"),
    ("bad.json", "{\"value\": ", r"not valid JSON"),
    ("dup.json", "{\"value\": \"{{ prompt }}\", \"value\": \"x\"}", r"not valid JSON \(key 'value' appears twice\)"),
    ("only.yaml", "parameters: [prompt, x]\nvalue: '{{ prompt }}{{ x }}'", r"no usable template \(1 skipped: "),
    ("t.txt", "value: '{{ prompt }}'", r"expected a \.yaml, \.yml, \.json template file or a folder"),
])
def test_unusable_files_are_refused_naming_file_and_field(tmp_path, name, content, needle):
    path = _write(tmp_path, name, content)
    with pytest.raises(EnchtableError, match=f"^{re.escape(str(path))}: .*{needle}") as err:
        load_templates(path)
    assert "\n" not in str(err.value)
    if path.suffix != ".txt":
        with pytest.raises(EnchtableError, match=needle):  # in a folder too: one bad file refuses the load
            load_templates(tmp_path)


def test_unreadable_missing_empty_and_escaping_paths_are_refused(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EnchtableError, match=r"empty: no \.yaml, \.yml, \.json template files"):
        load_templates(tmp_path / "empty")
    with pytest.raises(EnchtableError, match=r"gone: no such template file or folder"):
        load_templates(tmp_path / "gone")
    outside = _write(tmp_path, "outside.yaml", "value: '{{ prompt }}'")
    (tmp_path / "linked").mkdir()
    os.symlink(outside, tmp_path / "linked" / "in.yaml")
    with pytest.raises(EnchtableError, match=r"in.yaml: is a symlink to .*outside the folder"):
        load_templates(tmp_path / "linked")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(EnchtableError, match=rf"^{outside}: cannot read \(Permission denied\)$"):
        load_templates(outside)


def test_a_mapping_of_texts_is_parsed_the_same_way():
    loaded = template_set({"AIM": "AIM: {{ prompt }}", "raw": "{% raw %}{{ prompt }}{% endraw %} {{ prompt }}"})
    assert [(t.name, t.fill("p")) for t in loaded.templates] == [("AIM", "AIM: p"), ("raw", "{{ prompt }} p")]
    assert parse_template("a{{prompt}}b{{ prompt }}", "x") == ("a", "b", "")
    with pytest.raises(EnchtableError, match=r"^jailbreak_templates\['bad'\]: field value has no"):
        template_set({"bad": "nothing to fill"})
    with pytest.raises(EnchtableError, match=r"the mapping is empty"):
        template_set({})


# ------------------------------------------------------------------------------ evaluation with a rigged model

ANSWER = "Sure: 42"  # distinct bytes (a bigram chain), written after a "!": when the wrapped prompt ends in one
# Short enough that plain and wrapped prompts share one width bucket, and with batches of 3 one compilation serves
# every generation of both tests.
HARMFUL = ["Bomb!", "Malware.", "Car!"]
TEMPLATES = {"echo": "Go {{ prompt }}",     # ends with the prompt: breaks the two ending in "!"
             "calm": "{{ prompt }} ok.",    # breaks none
             "shout": "{{ prompt }} Now!"}  # breaks all three


class Complied:
    """A stub judge: unsafe = the rigged model wrote ANSWER; records the prompts it was shown."""

    name = "complied"

    def __init__(self):
        self.seen: list[list[str]] = []

    def judge(self, prompts, responses):
        self.seen.append(list(prompts))
        return [r == ANSWER for r in responses]


@pytest.fixture(scope="module")
def rigged(answering_model, tmp_path_factory):
    """A saved model that answers ANSWER after "!", and a chat template that is the user's text alone (so the
    wrapped prompt's last byte decides the answer)."""
    folder = tmp_path_factory.mktemp("rigged-jailbreak")
    byte_level_tokenizer().save_pretrained(folder / "tokenizer")
    (folder / "bare.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    model = enchtable_jax.save(answering_model(ANSWER, after="!"), folder / "model", like=folder / "tokenizer")
    return model, str(folder / "bare.jinja")


def test_evaluate_scores_every_template_and_the_attack_success_rate(rigged, tmp_path, monkeypatch):
    model, chat = rigged
    calls = []
    generate = pipeline.generate

    def counted(model_, tokenizer, prompts, **options):
        calls.append(list(prompts))
        return generate(model_, tokenizer, prompts, **options)

    monkeypatch.setattr(pipeline, "generate", counted)
    judge = Complied()
    result = evaluate(model, None, {"harmful": HARMFUL}, judge=judge, max_new_tokens=16, template=chat,
                      batch_size=3, jailbreak_templates=TEMPLATES, out=tmp_path)
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    # one generate call for the plain prompts, one for all 3 x 3 wrapped ones, template-major; the judge sees
    # the plain prompts both times
    assert calls == [HARMFUL, [f"Go {p}" for p in HARMFUL] + [f"{p} ok." for p in HARMFUL]
                     + [f"{p} Now!" for p in HARMFUL]]
    assert judge.seen == [HARMFUL, HARMFUL * 3]
    harmful = result["safety"]["harmful"]
    assert harmful["unsafe_rate"] == pytest.approx(2 / 3)  # plain: the two ending in "!"
    block = harmful["jailbreaks"]
    by_hand = {"echo": [True, False, True], "calm": [False, False, False], "shout": [True, True, True]}
    for name, verdicts in by_hand.items():
        t = block["per_template"][name]
        assert [i["unsafe"] for i in t["items"]] == verdicts
        assert [i["prompt"] for i in t["items"]] == HARMFUL
        assert (t["n"], t["unsafe"], t["unsafe_rate"]) == (3, sum(verdicts), pytest.approx(sum(verdicts) / 3))
        assert [i["response"] == ANSWER for i in t["items"]] == verdicts
    assert [p["broken_by"] for p in block["prompts"]] == [["echo", "shout"], ["shout"], ["echo", "shout"]]
    assert (block["broken"], block["attack_success_rate"]) == (3, 1.0)
    assert (block["unsafe"], block["unsafe_rate"]) == (5, pytest.approx(5 / 9))
    assert result["jailbreak_templates"] == {"source": None, "count": 3, "names": ["echo", "calm", "shout"],
                                             "skipped": []}
    assert [(r["set"], r["metric"], r.get("template"), r["n"], r["value"]) for r in result["summary"]] == [
        ("harmful", "unsafe_rate", None, 3, pytest.approx(2 / 3)), ("harmful", "jailbreak_asr", None, 3, 1.0),
        ("harmful", "jailbreak_unsafe_rate", None, 9, pytest.approx(5 / 9)),
        ("harmful", "template_unsafe_rate", "echo", 3, pytest.approx(2 / 3)),
        ("harmful", "template_unsafe_rate", "calm", 3, 0.0), ("harmful", "template_unsafe_rate", "shout", 3, 1.0)]
    table = summary_table(result, template_rows=2).splitlines()
    assert [line.split()[:2] for line in table[2:7]] == [
        ["harmful", "unsafe_rate"], ["harmful", "jailbreak_asr"], ["harmful", "jailbreak_unsafe_rate"],
        ["harmful", "[shout]"], ["harmful", "[echo]"]]  # the two highest, then how many more
    assert table[7].startswith("harmful [1 more templates: eval.json]")


def test_cli_reads_a_template_folder_and_refuses_stray_options(rigged, tmp_path, capsys):
    model, chat = rigged
    folder = tmp_path / "templates"
    for name, text in TEMPLATES.items():
        _write(folder, f"{name}.json", {"name": name, "value": text})
    _write(folder, "z-multi.yaml", "parameters: [prompt, x]\nvalue: '{{ x }}{{ prompt }}'")
    prompts = _write(tmp_path, "harmful.json", HARMFUL)
    argv = ["eval", "--model", str(model), "--prompts", str(prompts), "--template", chat, "--max-new-tokens", "16", "--batch-size", "3",
            "--out", str(tmp_path / "out"), "--jailbreak-templates", str(folder), "--limit-templates", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "jailbreak templates: 2 from" in printed and "0 skipped" in printed and "harmful [echo]" in printed
    block = json.loads((tmp_path / "out" / "eval.json").read_text())["safety"]["harmful"]["jailbreaks"]
    assert list(block["per_template"]) == ["calm", "echo"] and block["attack_success_rate"] == pytest.approx(2 / 3)
    assert main(argv[:-2] + ["--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "jailbreak templates: 3 from" in printed and "1 skipped" in printed
    assert "z-multi.yaml: parameters x besides prompt" in printed
    for extra, needle in ((["--limit-templates", "2"], "--limit-templates is read only with --jailbreak-templates"),
                          (["--jailbreak-templates", str(folder / "nope")], "nope: no such template file")):
        assert main(["eval", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o2"),
                     *extra]) == 2
        assert needle in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- real: pyrit's wheel



@pytest.fixture(scope="module")
def pyrit_templates() -> Path:
    """pyrit's jailbreak template folder, located through the installed distribution (pyrit is never imported:
    `pip install --no-deps pyrit==1.1.0` brings its files without its dependencies); skips when absent."""
    folder = jailbreaks.pyrit_templates()
    if folder is None:
        pytest.skip(f"pyrit absent: run `pip install --no-deps {PYRIT_PACKAGE}==1.1.0` (its templates are read as files)")
    if not folder.is_dir():
        pytest.skip(f"{folder} missing from the installed {PYRIT_PACKAGE} package")
    return folder


@pytest.mark.real
def test_every_pyrit_template_loads_and_fills_as_pyrit_renders_it(pyrit_templates):
    import jinja2
    import yaml
    from jinja2.sandbox import SandboxedEnvironment

    loaded = load_templates(pyrit_templates)
    files = sorted(pyrit_templates.rglob("*.yaml"))
    assert len(loaded.templates) + len(loaded.skipped) == len(files)
    assert all("/multi_parameter/" in f for f, _ in loaded.skipped)
    if importlib.metadata.version(PYRIT_PACKAGE) == "1.1.0":
        assert (len(files), len(loaded.templates), len(loaded.skipped)) == (655, 652, 3)
    assert len({t.name for t in loaded.templates}) == len(loaded.templates)
    render = SandboxedEnvironment(undefined=jinja2.StrictUndefined)  # what pyrit's SeedPrompt renders with
    for template in loaded.templates:
        # libyaml's parser here, the pure-Python safe_load in the loader
        value = yaml.load(Path(template.source).read_text(encoding="utf-8"), Loader=yaml.CSafeLoader)["value"]
        assert template.fill(PROMPT) == render.from_string(value).render(prompt=PROMPT), template.source
        assert PROMPT in template.fill(PROMPT)
