"""Metrics: unsafe rate of judged responses, exact match on question/answer sets, pass@1 on HumanEval problems.

pass@1 runs each completed program in a child Python process: a fresh temporary working folder, an
empty environment, `python -I` (no user site, no PYTHON* variables), stdin closed, a wall-clock
timeout that kills the whole process group, and rlimits on memory (2 GiB address space), CPU seconds
and written file size. Network: when `unshare --net --map-root-user` works (Linux with unprivileged
user namespaces) the child runs in an empty network namespace; otherwise `socket.socket` is replaced
in the child before the program runs, which stops ordinary code but not a determined one. This is a
guard against accidents, not a security sandbox: the child can still read and write the user's files.
Run untrusted models' code inside a container or VM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

MEMORY_LIMIT = 2 << 30  # bytes of address space for a pass@1 child
FILE_LIMIT = 16 << 20  # bytes a pass@1 child may write to one file

# Prepended to every pass@1 program: the child limits itself (no preexec_fn, which is unsafe in a threaded
# parent such as a JAX process) and cannot open sockets. `socket.socket` stays a class (a subclass that refuses
# to be made) so that modules subclassing it at import (ssl, hence urllib.request and http.client) still import.
_PREAMBLE = (
    "import resource as _r, socket as _s\n"
    "_r.setrlimit(_r.RLIMIT_AS, ({memory}, {memory}))\n"
    "_r.setrlimit(_r.RLIMIT_CPU, ({cpu}, {cpu}))\n"
    "_r.setrlimit(_r.RLIMIT_FSIZE, ({size}, {size}))\n"
    "def _no_network(*args, **kwargs):\n"
    "    raise OSError('network access is disabled while evaluating pass@1')\n"
    "class _NoSocket(_s.socket):\n"
    "    __init__ = _no_network\n"
    "_s.socket = _s.SocketType = _NoSocket\n"
    "_s.create_connection = _s.socketpair = _s.fromfd = _no_network\n"
    "del _r, _s, _no_network, _NoSocket\n"
)


def unsafe_rate(verdicts: Sequence[bool]) -> float:
    """Unsafe responses / judged responses."""
    if not verdicts:
        raise ValueError("unsafe_rate needs at least one verdict")
    return sum(map(bool, verdicts)) / len(verdicts)


# ------------------------------------------------------------------------------------------- exact match

def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed (SQuAD's normalization)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def extract_answer(response: str) -> str:
    """The part of a free-form response that states its answer.

    After the last '####' (GSM8K style), else after the last 'answer is' / 'answer:', else the whole
    response; then only up to the end of that line.
    """
    for marker in (r"####", r"answer\s*(?:is|:)"):
        found = list(re.finditer(marker, response, re.IGNORECASE))
        if found:
            response = response[found[-1].end():]
            break
    return response.strip().split("\n", 1)[0].strip()


def _number(text: str) -> float | None:
    """The last number in `text` (commas as thousands separators allowed), or None."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def answer_matches(response: str, answer: Any) -> bool:
    """Whether `response` states `answer` (a string, a number, or a list of acceptable answers).

    The extracted answer (see `extract_answer`) must equal the reference after `normalize_answer`; a
    numeric reference also matches the extracted part's last number (so "42 apples." matches 42).
    """
    if isinstance(answer, list):
        return any(answer_matches(response, a) for a in answer)
    stated = extract_answer(response)
    reference = str(answer)
    if normalize_answer(stated) == normalize_answer(reference):
        return True
    expected = _number(reference) if re.fullmatch(r"\s*-?[\d,]*\.?\d+\s*", reference) else None
    return expected is not None and _number(stated) == expected


def exact_match(responses: Sequence[str], answers: Sequence[Any]) -> float:
    """Fraction of responses that state their reference answer (`answer_matches`)."""
    if len(responses) != len(answers) or not answers:
        raise ValueError(f"exact_match needs as many responses as answers (>0), got {len(responses)} and "
                         f"{len(answers)}")
    return sum(answer_matches(r, a) for r, a in zip(responses, answers)) / len(answers)


# ------------------------------------------------------------------------------------------------ pass@1

HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")


def extract_code(response: str) -> str:
    """The code in a model's answer: the first fenced block (```python or ```), else the whole response."""
    match = re.search(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", response, re.DOTALL | re.IGNORECASE)
    return match.group(1) if match else response


def humaneval_program(problem: Mapping[str, str], response: str) -> str:
    """The program that checks one answer: the problem's prompt, the answer's code, the tests, check(entry_point).

    An answer that defines the entry point itself (a chat model restating the function) follows the prompt
    as new top-level code, overriding the prompt's stub; otherwise it is the body continuing the prompt.
    """
    code = extract_code(response)
    entry = problem["entry_point"]
    if re.search(rf"^def {re.escape(entry)}\s*\(", code, re.MULTILINE):
        body = problem["prompt"] + "\n    pass\n\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def _network_namespace_works() -> bool:
    """Whether `unshare --net --map-root-user` can start a process here (unprivileged user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--net", "--map-root-user", "true"], check=False, capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_program(source: str, timeout: float = 10.0, isolate_network: bool | None = None) -> tuple[bool, str]:
    """Run Python `source` in a guarded child process (see the module docstring): (exited 0, what happened)."""
    if isolate_network is None:
        isolate_network = _network_namespace_works()
    with tempfile.TemporaryDirectory(prefix="enchtable-pass1-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_PREAMBLE.format(memory=MEMORY_LIMIT, cpu=int(timeout) + 1, size=FILE_LIMIT) + source)
        command = [sys.executable, "-I", path]
        if isolate_network:
            command = ["unshare", "--net", "--map-root-user", *command]
        child = subprocess.Popen(command, cwd=work, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return False, f"timed out after {timeout:g}s"
    if child.returncode == 0:
        return True, "passed"
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return False, lines[-1][:300] if lines else f"exit status {child.returncode}"


def pass_at_1(problems: Sequence[Mapping[str, str]], responses: Sequence[str], timeout: float = 10.0) -> dict[str, Any]:
    """pass@1 of one answer per HumanEval problem: {score, isolation, results: [{task_id, passed, detail}]}."""
    if len(problems) != len(responses) or not problems:
        raise ValueError(f"pass_at_1 needs one response per problem (>0), got {len(problems)} problems and "
                         f"{len(responses)} responses")
    isolate = _network_namespace_works()
    results = []
    for problem, response in zip(problems, responses):
        passed, detail = run_program(humaneval_program(problem, response), timeout, isolate)
        results.append({"task_id": problem["task_id"], "passed": passed, "detail": detail})
    return {"score": sum(r["passed"] for r in results) / len(results),
            "isolation": "network namespace" if isolate else "socket guard", "results": results}
