"""Every figure in bench/RESULTS.md can be traced to raw data, and the README quotes only those figures.

For each JSON that RESULTS.md cites (``bench/results/....json``) the check asks: it is committed in this
checkout and parses; it records the command that produced it (``command``), the commit it ran at
(``env.commit``, 40 hex digits) with a clean working tree (``env.dirty`` false) and the machine
(``env.cpu_model``, which RESULTS.md must name); every timing summary in it (a dict with ``median``) carries
``p20``, ``p80`` and ``rounds``; and the command's script existed at that commit (``git cat-file -e
SHA:path``). A section of RESULTS.md that calls a target met must cite JSONs whose summaries have at least
MIN_ROUNDS rounds, and report the p20–p80 spread. Finally, every figure in the README's Results tables
appears in RESULTS.md.

Without git history (an unpacked archive, a shallow clone missing the commit) the script check says so
and skips; everything else is still checked. Run it as a script for a report:
``python tests/bench/test_results_provenance.py``.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
README = ROOT / "README.md"
MIN_ROUNDS = 7
SHA40 = re.compile(r"[0-9a-f]{40}")
CITED_JSON = re.compile(r"bench/results/[\w./-]+?\.json")
ANY_CITATION = re.compile(r"bench/results/[^\s`)\]'\"]*")
# Where the project's modules live when the pyproject at the commit cannot be read (see setup: package-dir).
DEFAULT_PACKAGE_DIRS = {"memtrain.kernels": "kernels", "memtrain.bench": "bench", "memtrain.csrc": "csrc"}
DEFAULT_SCRIPTS = {"memtrain-bench": "memtrain.bench.cli:main", "memtrain-demo": "memtrain.demo:main"}


# ----------------------------------------------------------------------------------------------- parsing
def cited_jsons(results_text: str) -> list[str]:
    """The JSON paths RESULTS.md cites, in order, each once."""
    return list(dict.fromkeys(CITED_JSON.findall(results_text)))


def vague_citations(results_text: str) -> list[str]:
    """Mentions of bench/results/ that name no single JSON file (a folder, a glob): not checkable."""
    return [c for c in dict.fromkeys(ANY_CITATION.findall(results_text))
            if c != "bench/results/" and not CITED_JSON.fullmatch(c)]


def sections(markdown: str) -> list[str]:
    """The text of each heading's section (a section ends at the next heading of any level)."""
    return [s for s in re.split(r"(?m)^(?=#{1,6} )", markdown) if s.strip()]


def claims_target_met(section: str) -> bool:
    """Whether a sentence of the section speaks of a target and says it is met (not "not met"); text in
    double quotes (the rules quoting the phrase) is not a claim."""
    text = re.sub(r'"[^"]*"', "", " ".join(section.split()))
    return any(re.search(r"\btargets?\b", sentence, re.I) and re.search(r"(?<!not )\b(?:met|meets)\b", sentence, re.I)
               for sentence in re.split(r"[.;!?](?:\s|$)", text))


def table_figures(markdown: str, heading: str = "## Results") -> list[str]:
    """The numbers in the figure columns (all but the first) of the tables in the section ``heading``."""
    start = markdown.find(heading + "\n")
    if start < 0:
        return []
    end = markdown.find("\n## ", start + len(heading))
    figures = []
    for line in markdown[start:end if end > 0 else None].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if len(cells) < 2 or all(set(c) <= set("-: ") for c in cells):
            continue
        for cell in cells[1:]:
            figures += re.findall(r"\d+(?:\.\d+)?", cell)
    return figures


def figure_appears(figure: str, text: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])", text) is not None


def summaries(record) -> list[dict]:
    """Every timing summary in a record: a dict with a ``median``, at any depth."""
    found = []
    if isinstance(record, dict):
        if "median" in record:
            found.append(record)
        for value in record.values():
            found += summaries(value)
    elif isinstance(record, list):
        for value in record:
            found += summaries(value)
    return found


# ------------------------------------------------------------------------------------------ the checks
def record_problems(path: str, root: pathlib.Path, results_text: str) -> tuple[dict | None, list[str]]:
    """(the parsed record, what is wrong with it) for a JSON that RESULTS.md cites."""
    file = root / path
    if not file.is_file():
        return None, [f"{path}: cited by RESULTS.md but not in the checkout"]
    try:
        record = json.loads(file.read_text())
    except ValueError as err:
        return None, [f"{path}: not valid JSON ({err})"]
    problems = []
    env = record.get("env") if isinstance(record, dict) else None
    if not isinstance(env, dict):
        return record, [f"{path}: no 'env' object (commit, dirty, cpu_model): its provenance is not recorded"]
    commit = env.get("commit")
    if not (isinstance(commit, str) and SHA40.fullmatch(commit)):
        problems.append(f"{path}: env.commit is {commit!r}, not a full 40-hex commit SHA")
    if env.get("dirty") is not False:
        problems.append(f"{path}: env.dirty is {env.get('dirty')!r}: measured on a working tree that differed "
                        "from its commit (or did not record it)")
    command = record.get("command")
    if not (isinstance(command, str) and command.strip()):
        problems.append(f"{path}: no 'command' recorded")
    cpu = env.get("cpu_model")
    if not (isinstance(cpu, str) and cpu.strip()):
        problems.append(f"{path}: no env.cpu_model recorded")
    elif cpu not in results_text:
        problems.append(f"{path}: RESULTS.md does not name its machine, {cpu!r} (env.cpu_model)")
    gpu = env.get("device_name") if str(env.get("device", "")).startswith("cuda") else None
    if gpu is not None and (not isinstance(gpu, str) or gpu not in results_text):
        problems.append(f"{path}: RESULTS.md does not name its GPU, {gpu!r} (env.device_name)")
    for s in summaries(record):
        missing = [k for k in ("p20", "p80", "rounds") if k not in s]
        if missing:
            problems.append(f"{path}: a timing summary has a median but no {', '.join(missing)}")
            break
    return record, problems


def spread_problems(results_text: str, root: pathlib.Path) -> list[str]:
    """A section that calls a target met must cite JSONs with >= MIN_ROUNDS rounds and report p20–p80."""
    problems = []
    for section in sections(results_text):
        if not claims_target_met(section):
            continue
        title = section.splitlines()[0].lstrip("# ").strip()
        paths = cited_jsons(section)
        if not paths:
            problems.append(f"RESULTS.md, '{title}': claims a target met without citing raw data")
        if "p20" not in section or "p80" not in section:
            problems.append(f"RESULTS.md, '{title}': claims a target met without reporting the p20–p80 spread")
        for path in paths:
            try:
                record = json.loads((root / path).read_text())
            except (OSError, ValueError):
                continue  # reported by record_problems
            rounds = [s.get("rounds") for s in summaries(record)]
            if not rounds or any(not isinstance(r, int) or r < MIN_ROUNDS for r in rounds):
                problems.append(f"RESULTS.md, '{title}': claims a target met from {path}, whose summaries have "
                                f"rounds {rounds} (need >= {MIN_ROUNDS} interleaved rounds)")
    return problems


def readme_problems(readme_text: str, results_text: str) -> list[str]:
    if not re.search(r"(?m)^## Results$", readme_text):
        return ["README has no '## Results' section (the figures it quotes are checked there)"]
    return [f"README's Results table quotes {f}, which RESULTS.md does not contain"
            for f in dict.fromkeys(table_figures(readme_text)) if not figure_appears(f, results_text)]


# ------------------------------------------------------------------------------- scripts at their commit
def git(root: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)


def git_history_problem(root: pathlib.Path) -> str | None:
    """Why this checkout cannot answer "did path exist at commit" (None when it can)."""
    try:
        probe = git(root, "rev-parse", "--verify", "HEAD")
    except (OSError, subprocess.SubprocessError) as err:
        return f"git cannot run here ({err})"
    if probe.returncode != 0:
        return f"this checkout has no git history ({probe.stderr.strip() or 'git rev-parse HEAD failed'})"
    return None


def project_layout(root: pathlib.Path, commit: str) -> tuple[dict, dict]:
    """(package-dir mapping, console scripts) from pyproject.toml at ``commit`` (the defaults if unreadable)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        return DEFAULT_PACKAGE_DIRS, DEFAULT_SCRIPTS
    shown = git(root, "show", f"{commit}:pyproject.toml")
    if shown.returncode != 0:
        return DEFAULT_PACKAGE_DIRS, DEFAULT_SCRIPTS
    data = tomllib.loads(shown.stdout)
    dirs = data.get("tool", {}).get("setuptools", {}).get("package-dir", {}) or DEFAULT_PACKAGE_DIRS
    return dirs, data.get("project", {}).get("scripts", {}) or DEFAULT_SCRIPTS


def module_paths(module: str, package_dirs: dict) -> list[str]:
    """Candidate files of ``python -m module``: ``<path>.py`` or ``<path>/__main__.py``."""
    prefix = max((p for p in package_dirs if module == p or module.startswith(p + ".")), key=len, default=None)
    if prefix is None:
        base = module.replace(".", "/")
    else:
        rest = module[len(prefix):].lstrip(".")
        base = "/".join(x for x in [package_dirs[prefix], rest.replace(".", "/")] if x)
    return [f"{base}.py", f"{base}/__main__.py"]


def command_scripts(command: str, package_dirs: dict, scripts: dict) -> list[list[str]]:
    """The files a command runs, each as a list of candidate paths (one of which must exist)."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value prefixes
    if not words:
        return []
    program = pathlib.PurePosixPath(words[0]).name
    if program in scripts:
        return [module_paths(scripts[program].split(":")[0], package_dirs)]
    if program == "pytest":
        return [[w.split("::")[0]] for w in words[1:] if w.split("::")[0].endswith(".py")]
    if re.fullmatch(r"python[\d.]*", program):
        args = [w for w in words[1:] if w not in ("-u", "-O", "-B")]
        if len(args) >= 2 and args[0] == "-m":
            if args[1] == "pytest":
                return [[w.split("::")[0]] for w in args[2:] if w.split("::")[0].endswith(".py")]
            return [module_paths(args[1], package_dirs)]
        if args and args[0].endswith(".py"):
            return [[args[0]]]
    return []


def script_problems(records: dict[str, dict], root: pathlib.Path) -> tuple[list[str], list[str]]:
    """(failures, what could not be checked) for the recorded commands' scripts at their commits."""
    failures, unchecked = [], []
    shallow = git(root, "rev-parse", "--is-shallow-repository").stdout.strip() == "true"
    for path, record in records.items():
        commit, command = record.get("env", {}).get("commit"), record.get("command")
        if not (isinstance(commit, str) and SHA40.fullmatch(commit) and isinstance(command, str)):
            continue  # reported by record_problems
        if git(root, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
            if shallow:
                unchecked.append(f"{path}: commit {commit} is not in this shallow clone")
            else:
                failures.append(f"{path}: commit {commit} is not in this repository's history")
            continue
        package_dirs, scripts = project_layout(root, commit)
        files = command_scripts(command, package_dirs, scripts)
        if not files:
            failures.append(f"{path}: cannot tell which script the command {command!r} runs")
        for candidates in files:
            if not any(git(root, "cat-file", "-e", f"{commit}:{c}").returncode == 0 for c in candidates):
                failures.append(f"{path}: {' or '.join(candidates)} (run by {command!r}) does not exist at {commit}")
    return failures, unchecked


# ------------------------------------------------------------------------------------------------ tests
def _load() -> tuple[str, dict[str, dict], list[str]]:
    results_text = RESULTS_MD.read_text()
    records = {}
    problems = [f"RESULTS.md cites {c}: cite each JSON file by its path" for c in vague_citations(results_text)]
    for path in cited_jsons(results_text):
        record, found = record_problems(path, ROOT, results_text)
        problems += found
        if isinstance(record, dict):
            records[path] = record
    return results_text, records, problems


def test_cited_results_exist_and_record_their_provenance():
    _, _, problems = _load()
    assert not problems, "RESULTS.md cites raw data without provenance:\n  " + "\n  ".join(problems)


def test_target_claims_have_a_spread_over_enough_rounds():
    problems = spread_problems(RESULTS_MD.read_text(), ROOT)
    assert not problems, "\n  ".join(["target claims without a spread:", *problems])


def test_readme_figures_come_from_results():
    problems = readme_problems(README.read_text(), RESULTS_MD.read_text())
    assert not problems, "\n  ".join(problems)


def test_recorded_commands_existed_at_their_commits():
    why = git_history_problem(ROOT)
    if why:
        pytest.skip(f"cannot check that each recorded command's script existed at its commit: {why}. The other "
                    "provenance checks ran; CI runs on a clone with history, where this one runs too")
    _, records, _ = _load()
    failures, unchecked = script_problems(records, ROOT)
    assert not failures, "\n  ".join(["recorded commands whose script did not exist at the commit:", *failures])
    if unchecked:
        pytest.skip("could not check: " + "; ".join(unchecked))


# ----------------------------------------------------------------- the check itself, on made-up records
GOOD_ENV = {"commit": None, "dirty": False, "cpu_model": "Test CPU 9000", "device": "cpu", "device_name": None}


def _record(tmp_path, name, results_text, **changes):
    record = {"command": "memtrain-bench zo --rounds 7", "env": dict(GOOD_ENV),
              "results": [{"method": "zo2", "step_s": {"median": 1.0, "p20": 0.9, "p80": 1.1, "rounds": 7}}]}
    for key, value in changes.items():
        target = record["env"] if key in GOOD_ENV else record
        target[key] = value
    (tmp_path / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (tmp_path / f"bench/results/{name}.json").write_text(json.dumps(record))
    return record_problems(f"bench/results/{name}.json", tmp_path, results_text)[1]


def test_the_record_check_catches_what_it_should(tmp_path):
    text = "Machine: Test CPU 9000. Raw JSON: `bench/results/a.json`"
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert _record(tmp_path, "a", text, commit=sha) == []
    assert any("40-hex" in p for p in _record(tmp_path, "a", text, commit="0123456"))
    assert any("40-hex" in p for p in _record(tmp_path, "a", text, commit=sha[:7] + "-dirty"))
    assert any("env.dirty" in p for p in _record(tmp_path, "a", text, commit=sha, dirty=True))
    assert any("no 'command'" in p for p in _record(tmp_path, "a", text, commit=sha, command=""))
    assert any("does not name its machine" in p for p in _record(tmp_path, "a", "Machine: a laptop", commit=sha))
    assert any("does not name its GPU" in p for p in _record(tmp_path, "a", text, commit=sha, device="cuda",
                                                              device_name="NVIDIA H200"))
    assert _record(tmp_path, "a", text + ", NVIDIA H200", commit=sha, device="cuda", device_name="NVIDIA H200") == []
    assert any("not in the checkout" in p for p in record_problems("bench/results/none.json", tmp_path, text)[1])
    assert vague_citations("in `bench/results/`; see bench/results/cli_zo_cpu/ and `bench/results/dp_*.json`, "
                           "bench/results/a.json") == ["bench/results/cli_zo_cpu/", "bench/results/dp_*.json"]


def test_the_spread_and_readme_checks_catch_what_they_should(tmp_path):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    few = {"results": {"zo2": {"median": 1.0, "p20": 0.9, "p80": 1.1, "rounds": 3}}}
    (tmp_path / "bench/results/few.json").write_text(json.dumps(few))
    claim = "## Offload\n\nThe target (<= 1.15) is met: 1.12 (p20 1.05, p80 1.2). Raw JSON: `bench/results/few.json`\n"
    assert any("rounds [3]" in p for p in spread_problems(claim, tmp_path))
    assert spread_problems(claim.replace("is met", "is not established"), tmp_path) == []
    assert any("without citing" in p for p in spread_problems("## X\n\nthe target\nis met, p20 p80\n", tmp_path))
    assert claims_target_met("flashdp meets the target") and claims_target_met("Target: **met**")
    assert not claims_target_met("a target counts as reached only with 7 rounds; it is not met here")
    readme = "## Results\n\n| what | memtrain |\n|---|---|\n| a step, OPT-125m | **1.22** |\n\n## Development\n"
    assert readme_problems(readme, "ratio 1.22 in the table") == []
    assert readme_problems(readme, "ratio 1.225") == ["README's Results table quotes 1.22, which RESULTS.md "
                                                      "does not contain"]
    assert readme_problems(readme.replace("## Results", "## Numbers"), "ratio 1.22") == [
        "README has no '## Results' section (the figures it quotes are checked there)"]


def test_the_script_check_resolves_commands():
    dirs, scripts = DEFAULT_PACKAGE_DIRS, DEFAULT_SCRIPTS
    assert command_scripts("memtrain-bench zo --model opt-125m", dirs, scripts) == [["bench/cli.py",
                                                                                      "bench/cli/__main__.py"]]
    assert command_scripts("python -m bench zo", dirs, scripts) == [["bench.py", "bench/__main__.py"]]
    assert command_scripts("python -m memtrain.bench.kernels.bench_zo_perturb --rounds 7", dirs, scripts) == [
        ["bench/kernels/bench_zo_perturb.py", "bench/kernels/bench_zo_perturb/__main__.py"]]
    assert command_scripts("OMP_NUM_THREADS=2 python3 bench/bench_zo_offload.py", dirs, scripts) == [
        ["bench/bench_zo_offload.py"]]
    assert command_scripts("pytest -m benchmark tests/bench/test_kernel_benchmarks.py::test_x", dirs, scripts) == [
        ["tests/bench/test_kernel_benchmarks.py"]]


def test_the_script_check_catches_a_deleted_script(tmp_path):
    if git_history_problem(ROOT):
        pytest.skip(f"no git history here: {git_history_problem(ROOT)}")
    head = git(ROOT, "rev-parse", "HEAD").stdout.strip()
    good = {"command": "python -m bench zo", "env": {"commit": head}}
    gone = {"command": "python bench/bench_zo_step.py", "env": {"commit": head}}  # deleted from the tree
    unknown = {"command": "python -m bench zo", "env": {"commit": "f" * 40}}
    failures, _ = script_problems({"good": good, "gone": gone, "unknown": unknown}, ROOT)
    assert [f.split(":")[0] for f in failures] == ["gone", "unknown"], failures


if __name__ == "__main__":
    text, recs, found = _load()
    found += spread_problems(text, ROOT) + readme_problems(README.read_text(), text)
    reason = git_history_problem(ROOT)
    if reason:
        print(f"not checked: scripts at their commits ({reason})")
    else:
        failed, skipped = script_problems(recs, ROOT)
        found += failed
        for s in skipped:
            print(f"not checked: {s}")
    print(f"{len(cited_jsons(text))} JSON files cited by RESULTS.md")
    print("\n".join(found) if found else "provenance: all checks passed")
    sys.exit(1 if found else 0)
