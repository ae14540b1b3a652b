"""The README is a test: every `kiln` command and flag it shows, and every option `kiln … --help` lists,
runs in the suite through the `kiln` executable (tests/support/kiln_cli.py), as a user types it.

How "runs in the suite" is checked, without running anything twice: the test modules are read
(ast), and a test function *exercises* a usage when one of its calls of the real command
(`run_kiln`, or the fault suite's `Kiln`) starts with the usage's subcommand and holds each of its
flags and each literal value the README shows (`500MB`, `0.05`); placeholders (`SOURCE`, `DIR`,
`KEY`, …) stand for paths and names. A flag in prose belongs to the command its paragraph named
last where that command has it, else to `kiln export`. `test_every_readme_usage_is_exercised` and
`test_every_help_option_is_exercised` fail on a usage or an option no test runs, so a flag
documented (or added) but never run is caught by CI. Where no other test ran a usage, the tests
below run it, several against the one session export (tests/conftest.py's `demo_export`).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from functools import cache
from pathlib import Path

from tests.support.kiln_cli import reached_prefect, run_kiln

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TESTS = REPO / "tests"
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")  # SOURCE, DIR, KEY, NAME, FILE, CATALOGUE
# Shell lines the README shows that are not `kiln`: what each is checked by instead.
NOT_KILN = {
    "./setup.sh": "CI runs it (.ci/run) on a fresh machine",
    ".venv/bin/python -m pytest -q": "CI runs it (.ci/run)",
    "prefect server start &": "Prefect's own command (tests/support/prefect_server.py starts the test server with it)",
    "export PREFECT_API_URL=http://127.0.0.1:4200/api": "a shell variable (tests/support/prefect_server.py sets it)",
}
CLI_CALLS = {"run_kiln", "Kiln"}


# ------------------------------------------------------------------ what the README shows


def _code_spans(text: str) -> list[list[str]]:
    """Inline code spans outside fenced blocks, by paragraph (a bullet is one), a span broken over two
    lines joined with a space."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    paragraphs = re.split(r"\n\s*\n|\n(?=- )", prose)
    return [[" ".join(span.split()) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", paragraph)]
            for paragraph in paragraphs]


def _sh_lines(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            lines += [part.strip() for part in line.split("&&") if part.strip()]
    return lines


def _expand(usage: str) -> list[list[str]]:
    """One README usage as the argument lists it stands for: `[--json]` is a flag to exercise,
    `list | show KEY | check` three commands, `cpu|gpu` two values."""
    words = usage.replace("[", "").replace("]", "").split()
    if " | " in usage:  # `kiln registry list | show KEY | check`
        head, *alternatives = " ".join(words).split(" | ")
        stem = head.split()[:-1]
        return [[*stem, head.split()[-1]], *([*stem, *alt.split()] for alt in alternatives)]
    for i, word in enumerate(words):
        if "|" in word:
            return [[*words[:i], choice, *words[i + 1:]] for choice in word.split("|")]
    return [words]


@cache
def readme_usages() -> dict[str, list[list[str]]]:
    """Every `kiln` usage the README shows (sh blocks and code spans), expanded; key: the text as shown."""
    text = README.read_text(encoding="utf-8")
    usages: dict[str, list[list[str]]] = {}
    for line in _sh_lines(text):
        if line.startswith((".venv/bin/kiln ", "kiln ")):
            usages[line] = [w[1:] for w in _expand(line.removeprefix(".venv/bin/"))]
        else:
            assert line in NOT_KILN, f"README shows the shell line {line!r}: run it in a test, or say in NOT_KILN why not"
    groups = {path[0] for path in _help_options() if len(path) > 1}
    for paragraph in _code_spans(text):
        # A flag in prose belongs to the command the paragraph last named where that command has it,
        # else to `kiln export`.
        command = ["export"]
        for span in paragraph:
            if span.startswith("kiln "):
                usages[span] = [w[1:] for w in _expand(span)]
                words = span.split()[1:]
                command = words[:2] if words[0] in groups else words[:1]
            elif span.startswith("--"):
                owner = command if span.split()[0] in _help_options().get(tuple(command), ()) else ["export"]
                usages.setdefault(span, [])
                usages[span] += [[*owner, *w] for w in _expand(span) if [*owner, *w] not in usages[span]]
    return usages


def _needed_words(argv: list[str]) -> list[str]:
    return [w for w in argv if not PLACEHOLDER.match(w)]


# ------------------------------------------------------------------ what the tests run

UNKNOWN = "<?>"  # an argument the scan cannot read (a path, a variable)


class _Scope:
    """Names a call's arguments may refer to: the function's own assignments, then the module's."""

    def __init__(self, module: dict[str, ast.AST], function: ast.AST) -> None:
        self.names = dict(module)
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.names[node.targets[0].id] = node.value

    def tokens(self, node: ast.AST, depth: int = 0) -> list[str]:
        """The argv words `node` stands for, UNKNOWN where it cannot be read statically."""
        if depth > 5:
            return [UNKNOWN]
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Starred):
            return self.tokens(node.value, depth + 1)
        if isinstance(node, ast.List | ast.Tuple):
            return [w for item in node.elts for w in self.tokens(item, depth + 1)]
        if isinstance(node, ast.Name) and node.id in self.names:
            value = self.names[node.id]
            if isinstance(value, ast.List | ast.Tuple | ast.Constant):
                return self.tokens(value, depth + 1)
        return [UNKNOWN]

    def argv_lists(self, node: ast.AST) -> list[list[str]]:
        """Every literal list of strings under `node` (the rows of a parametrized table such as CLI_ROWS)."""
        found = []
        for sub in ast.walk(node):
            if isinstance(sub, ast.List | ast.Tuple) and sub.elts and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in sub.elts):
                found.append([e.value for e in sub.elts])
        return found


def _call_name(call: ast.Call) -> str | None:
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)


@cache
def cli_invocations() -> dict[str, list[list[str]]]:
    """Every test function that runs the `kiln` executable: 'file::name' → the argv of each call it makes.

    A call whose arguments come from a table (`run_kiln(*args)` with `args` from CLI_ROWS[row])
    stands for every row of the tables the function names.
    """
    found: dict[str, list[list[str]]] = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                module[node.targets[0].id] = node.value
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            scope = _Scope(module, function)
            runs = []
            for call in ast.walk(function):
                if isinstance(call, ast.Call) and _call_name(call) in CLI_CALLS and call.args:
                    argv = [w for arg in (call.args if _call_name(call) == "run_kiln" else call.args[:1])
                            for w in scope.tokens(arg)]
                    if argv and argv[0] == UNKNOWN:
                        tables = [module[n.id] for n in ast.walk(function) if isinstance(n, ast.Name) and n.id in module]
                        runs += [rows for table in tables for rows in scope.argv_lists(table)]
                    runs.append(argv)
            if runs:
                found[f"{path.relative_to(REPO)}::{function.name}"] = runs
    return found


def exercised_by(argv: list[str]) -> list[str]:
    """Tests that run `kiln` with `argv`'s command words first and its other words (flags, values) in the call."""
    groups = {path[0] for path in _help_options() if len(path) > 1}
    command = argv[:2] if argv[:1] and argv[0] in groups else argv[:1]
    rest = [w for w in _needed_words(argv) if w not in command]
    hits = []
    for name, runs in cli_invocations().items():
        for run in runs:
            words = {part for w in run for part in (w, *w.split("="))}
            if run[:len(command)] == command and all(w in words for w in rest):
                hits.append(name)
                break
    return hits


def test_the_readme_shows_what_this_module_expects():
    """The extraction itself: a README rewrite that hides commands from it must fail here, not pass quietly."""
    usages = readme_usages()
    assert "kiln export SOURCE --quant q4_k_m,q8_0 --out DIR [--json]" in usages
    assert usages["kiln registry list | show KEY | check"] == [["registry", "list"], ["registry", "show", "KEY"],
                                                               ["registry", "check"]]
    assert usages["--quant auto --max-size 500MB"] == [["export", "--quant", "auto", "--max-size", "500MB"]]
    assert "kiln export --ollama-name NAME" in usages  # a span broken over two lines
    assert len(usages) >= 20, sorted(usages)


def test_every_readme_usage_is_exercised():
    missing = {usage: argv for usage, forms in readme_usages().items() for argv in forms if not exercised_by(argv)}
    assert not missing, ("README usages no test runs through the kiln executable: "
                         + "; ".join(f"{u!r} ({' '.join(a)})" for u, a in missing.items()))


@cache
def _help_options() -> dict[tuple[str, ...], list[str]]:
    """Every option of every `kiln` command, as `kiln … --help` lists it."""
    import click

    from cli import cli

    options: dict[tuple[str, ...], list[str]] = {}

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
            return
        options[path] = [opt for p in command.params if isinstance(p, click.Option) for opt in p.opts[:1]
                         if opt != "--help"]

    walk(cli, ())
    return options


def test_every_help_option_is_exercised():
    missing = [f"kiln {' '.join(path)} {opt}" for path, opts in _help_options().items() for opt in opts
               if not exercised_by([*path, opt])]
    assert not missing, f"options `--help` lists that no test runs through the kiln executable: {missing}"


def test_every_command_runs_with_help():
    """`kiln COMMAND --help` for every command: the examples the help shows come from the options checked above."""
    for path in _help_options():
        proc = run_kiln(*path, "--help", timeout=60)
        assert proc.returncode == 0 and "Usage: kiln" in proc.stdout, (path, proc.stderr[-1000:])


# ------------------------------------------------------------------ the usages no other test ran


def _clean(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_readme_export_usage_line(tmp_path):
    """`kiln export SOURCE --quant q4_k_m,q8_0 --out DIR [--json]`, on the demo's own folder."""
    from tasks.demo import ensure_demo_model

    folder, _ = ensure_demo_model()
    out = tmp_path / "out"
    proc = run_kiln("export", str(folder), "--quant", "q4_k_m,q8_0", "--out", str(out), "--json", "--no-verify",
                    "--no-report", "--name", "readme", "--memory-budget", "12GB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    assert [o["quant"] for o in manifest["outputs"] if o["path"].endswith(".gguf")] == ["q4_k_m", "q8_0", "f16"]
    assert (out / "readme-q4_k_m.gguf").is_file() and (out / "readme-q8_0.Modelfile").is_file()


def _check_auto(proc, out: Path) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    _clean(proc)
    manifest = json.loads(proc.stdout)
    chosen = manifest["choice"]["quant"]
    assert "--quant auto chose" in proc.stderr and manifest["request"]["quants"] == ["auto"]
    assert (out / f"smollm2-135m-instruct-{chosen}.gguf").is_file()
    assert len(manifest["report"]["rows"]) >= 6  # every candidate measured, the reference besides


def test_readme_quant_auto_max_size(tmp_path):
    """`--quant auto --max-size 500MB`: was refused as "unknown quant type(s) auto" (issue 13.4)."""
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "auto", "--max-size", "500MB", "--out", str(out), "--no-verify",
                    "--json")
    _check_auto(proc, out)


def test_readme_quant_auto_max_kl(tmp_path):
    """`--quant auto --max-kl 0.05`: the candidates are cached by now, only the measuring runs again."""
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "auto", "--max-kl", "0.05", "--out", str(out), "--no-verify", "--json")
    _check_auto(proc, out)


def test_readme_report_and_json(demo_export):
    """`kiln report DIR` (a table) and `--json`, on the session's demo export."""
    out, manifest = demo_export
    table = run_kiln("report", str(out), timeout=300)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "Quant types: quality, size, speed" in table.stderr and "KL" in table.stderr
    as_json = run_kiln("report", str(out), "--json", timeout=300)
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    assert {r["quant"] for r in json.loads(as_json.stdout)["rows"]} >= {"q8_0", "q4_k_m"}


def test_readme_no_report_up_to_date_force_then_report(tmp_path):
    """`--no-report` skips the measurement; a re-run with the same inputs does nothing (Prefect never
    starts); `--force` exports again; `kiln report DIR` then measures the export and records it."""
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--quant", "q8_0", "--no-report", "--no-verify", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["report"] is None
    again = run_kiln("export", "demo", "--quant", "q8_0", "--no-report", "--no-verify", "--out", str(out))
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr[-3000:]
    assert not reached_prefect(again.stderr)
    forced = run_kiln("export", "demo", "--quant", "q8_0", "--no-report", "--no-verify", "--out", str(out), "--force")
    assert forced.returncode == 0 and "exporting (--force given)" in forced.stderr, forced.stderr[-3000:]
    report = run_kiln("report", str(out), "--json", timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["report"] is not None


def test_readme_registry_commands():
    """`kiln registry list | show KEY | check`."""
    listed = run_kiln("registry", "list", timeout=60)
    assert listed.returncode == 0 and "smollm2-135m-instruct" in listed.stdout, listed.stderr
    shown = run_kiln("registry", "show", "smollm2-135m-instruct", timeout=60)
    assert shown.returncode == 0 and json.loads(shown.stdout)["key"] == "smollm2-135m-instruct", shown.stderr
    checked = run_kiln("registry", "check", timeout=60)
    assert checked.returncode == 0 and "registry entries valid" in checked.stderr, checked.stderr


def test_readme_template_check(demo_model_dir):
    """`kiln template check FILE [--json]` on a `.jinja` file, the README's FILE."""
    jinja = demo_model_dir / "chat_template.jinja"
    text = run_kiln("template", "check", str(jinja), timeout=120)
    assert text.returncode == 0, text.stderr[-3000:]
    assert "dialect: chatml" in text.stderr
    as_json = run_kiln("template", "check", str(jinja), "--json", timeout=120)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["dialect"] == "chatml", as_json.stderr[-3000:]


def test_readme_register_with_host_and_name(demo_export, ollama_standin, tmp_path):
    """`kiln register DIR [--ollama-name NAME]` with `--host` instead of OLLAMA_HOST, against the stand-in."""
    out = tmp_path / "export"
    shutil.copytree(demo_export[0], out)
    proc = run_kiln("register", str(out), "--ollama-name", "readme-demo", "--host", ollama_standin.url,
                    env={"OLLAMA_HOST": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ollama_standin.model("readme-demo:q8_0") is not None


def test_readme_batch_check(tmp_path):
    """`kiln batch CATALOGUE [--check]` (`--out-root` too) on the shipped catalogue: validated, nothing exported."""
    out_root = tmp_path / "batch-out"
    proc = run_kiln("batch", str(REPO / "deployments" / "catalogue.yaml"), "--check", "--out-root", str(out_root),
                    timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "catalogue items valid" in proc.stderr and not out_root.exists()


def test_readme_setup_is_idempotent(toolchain, demo_model_dir):
    """`kiln setup`: the converter source, llama.cpp's tools and the demo model are there already, so it
    answers offline and builds nothing."""
    proc = run_kiln("setup", env={"PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converter:" in proc.stderr and "llama.cpp tools:" in proc.stderr and "demo model:" in proc.stderr
    assert "building llama.cpp" not in proc.stderr


def _refused_for_want_of_a_deployment(proc, pool: str) -> None:
    assert proc.returncode != 0, proc.stderr[-3000:]
    refusal = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(refusal) == 1, proc.stderr[-3000:]
    # No work pool on the temporary server, or no deployment on it: either way the refusal names the fix.
    assert f"placement {pool!r}" in refusal[0] and "placement local" in refusal[0], refusal[0]
    assert "prefect work-pool create" in refusal[0] or "prefect deploy" in refusal[0], refusal[0]


def test_readme_placement_without_deployments_says_how_to_deploy(tmp_path):
    """`--placement cpu|gpu` sends conversion to that pool's `convert-quantize` deployment; with none on the
    server (the temporary one here) the export stops there, before any conversion, and names the fix."""
    cpu = run_kiln("export", "demo", "--quant", "q8_0", "--no-verify", "--out", str(tmp_path / "c"), "--placement", "cpu")
    _refused_for_want_of_a_deployment(cpu, "cpu")
    gpu = run_kiln("export", "demo", "--quant", "q8_0", "--no-verify", "--out", str(tmp_path / "g"), "--placement", "gpu")
    _refused_for_want_of_a_deployment(gpu, "gpu")


def test_readme_trust_remote_code_lets_custom_code_past(demo_model_dir, tmp_path):
    """`--trust-remote-code`: without it a folder whose config names its own code is refused; with it
    the export goes on to the next check (here a made-up architecture, so nothing heavy runs)."""
    folder = tmp_path / "custom"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (folder / name).hardlink_to(demo_model_dir / name)
    config = json.loads((demo_model_dir / "config.json").read_text())
    config.update(architectures=["KilnMadeUpForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling_x.X"})
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    refused = run_kiln("export", str(folder), "--out", str(out), timeout=300)
    assert refused.returncode == 2 and "needs custom Python code" in refused.stderr, refused.stderr[-3000:]
    trusted = run_kiln("export", str(folder), "--out", str(out), "--trust-remote-code", timeout=300)
    assert trusted.returncode == 2, trusted.stderr[-3000:]
    assert "custom Python code" not in trusted.stderr and "KilnMadeUpForCausalLM" in trusted.stderr
    assert not out.exists()


def test_readme_demo_with_every_export_option(tmp_path):
    """`kiln demo` takes the export options: each once, against cached conversions (no verify, no report);
    the Ollama registration is deferred (no server), as the README says."""
    from tests.support.ollama_standin import closed_port

    out = tmp_path / "demo"
    proc = run_kiln("demo", "--out", str(out), "--name", "readme-demo", "--outtype", "f16", "--accept-license",
                    "--dialect", "chatml", "--no-report", "--no-verify", "--ollama-name", "readme-demo",
                    "--memory-budget", "12GB", "--force", "--json",
                    env={"OLLAMA_HOST": f"http://127.0.0.1:{closed_port()}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    assert {o["path"] for o in manifest["outputs"]} >= {"readme-demo-q8_0.gguf", "readme-demo-q4_k_m.gguf"}
    assert manifest["ollama"]["dialect"] == "chatml"
    assert any("kiln register" in (c["detail"] or "") for c in manifest["checks"])


def test_readme_batch_runs_a_catalogue(tmp_path):
    """`kiln batch CATALOGUE` with `--force` and `--memory-budget`: one demo item, exported from cached conversions."""
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text("bases:\n  - source: demo\n    name: readme-item\n    quants: [q8_0]\n    verify: false\n"
                         "    options: {report: false}\n", encoding="utf-8")
    out_root = tmp_path / "batch"
    proc = run_kiln("batch", str(catalogue), "--out-root", str(out_root), "--force", "--memory-budget", "12GB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out_root / "readme-item" / "readme-item-q8_0.gguf").is_file()
