"""The device script (bench/cuda_session.sh) runs only on a lent GPU machine, with minutes of budget: check here that
it parses and that every test file, benchmark module and option it names exists, so a rename cannot waste a lease."""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "cuda_session.sh"
TEXT = SCRIPT.read_text()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_named_test_files_exist():
    named = set(re.findall(r"tests/[\w/]+\.py", TEXT))
    assert named, "the script names no test file"
    missing = sorted(path for path in named if not (REPO / path).is_file())
    assert not missing, f"bench/cuda_session.sh names missing test files: {missing}"


def test_named_benchmark_modules_and_their_options_exist():
    # Each `-m bench.<module> ...` command: the module exists and every --option it is given is one it declares.
    commands = re.findall(r"-m (bench\.\w+)((?:\\\n|[^\n])*)", TEXT)
    assert {module for module, _ in commands} >= {"bench.report", "bench.profile", "bench.cold_start",
                                                  "bench.train_step"}
    for module, arguments in commands:
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        source = (REPO / (module.replace(".", "/") + ".py")).read_text()
        for option in re.findall(r"(--[a-z][\w-]*)", arguments):
            assert f'"{option}"' in source, f"{module} declares no option {option}"


def test_every_step_is_in_a_calls_default_list():
    # A step the script defines but neither call runs by default would silently never run on a device.
    defined = set(re.findall(r"wanted (\w+)", TEXT))
    defaults = " ".join(re.findall(r"STEPS=\$\{STEPS:-([^}]*)\}", TEXT)).split()
    assert defined == set(defaults), f"defined {sorted(defined)} vs run by default {sorted(defaults)}"
    assert len(defaults) == len(set(defaults)), "a step runs in both calls"


def test_inline_python_imports_resolve():
    # Each `$PY -c "..."` snippet: its sam2_fast imports name modules and names that exist (a moved module once broke
    # one here, which only the GPU machine would have shown).
    snippets = re.findall(r'\$PY -c "([^"]+)"', TEXT)
    assert snippets, "the script runs no inline Python"
    imports = [statement.strip() for snippet in snippets for statement in snippet.split(";")
               if re.match(r"\s*(from sam2_fast\S* import|import sam2_fast)", statement)]
    assert imports, "no inline sam2_fast import found to check"
    for statement in imports:
        exec(statement, {})
