"""Mutation testing of the code that keeps runs and users safe (cosmic-ray), resumable.

A mutant is one small change to the source (``<`` for ``<=``, ``and`` for ``or``, a number off by
one, an ``except OSError`` that no longer catches, a loop that never runs, ...). The campaign
applies each mutant in turn to a copy of the working tree and runs the tests that can see it; a
mutant the tests do not notice *survived*. The score is killed / (all - equivalent).

    python benchmarks/mutation.py run [--only NAME ...] [--minutes M]   # resumes where it stopped
    python benchmarks/mutation.py run --retest-survivors               # after adding tests
    python benchmarks/mutation.py report [--markdown]
    python benchmarks/mutation.py survivors [--only NAME ...]          # the diffs still alive
    python benchmarks/mutation.py count                                # mutants per target, no tests

Everything the campaign needs is named once, in ``TARGETS`` below: which module, which functions
of it (the parts that keep runs and users safe, not the whole file), and which test files can see
them, so a mutant runs only those tests (``pytest -x``: a killed mutant stops at its first failing
test). A refactor that moves code changes only this list.

State lives in ``--workdir`` (default ``.mutation/`` in the checkout, ignored by git): ``tree/``, a
copy of the checkout's files (tracked and untracked, not ignored) on which mutants are applied, so
the working tree is never touched, and ``session.sqlite``, cosmic-ray's work database with every
result. ``run`` does only what has no result yet, so a campaign can be stopped (Ctrl-C, or
``--minutes``) and continued. When a target module's source changes, its mutants are made anew
and its results dropped; when only tests change, ``--retest-survivors`` runs the survivors again
(killed mutants stay killed: tests only get added).

Equivalent mutants (the program behaves the same, so no test can kill them) are listed in
``EQUIVALENT`` with the reason, matched by module, operator and the source line's text, so line
numbers may move.

Needs ``pip install cosmic-ray`` (not a dependency of threedgen; this is not part of CI).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    name: str  # the row of the report
    module: str  # path from the repository root
    scope: tuple[str, ...]  # qualified names of the functions/classes mutated; ("*",) = the whole module
    tests: tuple[str, ...]  # pytest arguments (files, node ids) that can see them
    group: str = ""  # the report's group (the goals: checkpoints, skip/rollback, ...)
    sample: float = 1.0  # the share of the mutants tested (a fixed, seedless choice by each mutant's text)


# Test files by the code they guard.
T_CKPT = ("tests/test_checkpoints.py", "tests/test_system.py", "tests/test_bad_inputs.py::test_fault")
T_OUT = ("tests/test_outputs.py", "tests/test_cli.py", "tests/test_checkpoints.py", "tests/test_bad_inputs.py::test_fault")
T_CONFIG = ("tests/test_config.py", "tests/test_cli.py", "tests/test_limits.py", "tests/test_bad_inputs.py::test_input",
            "tests/test_config_keys.py")
T_AUTH = ("tests/test_webui_auth.py",)
T_JOBS = ("tests/test_jobs.py", "tests/test_webui.py::test_job_store_lifecycle",
          "tests/test_webui.py::test_state_and_outputs_must_be_separate",
          "tests/test_bad_inputs.py::test_fault[queue-full-or-double-submit]",
          "tests/test_batch.py::test_read_batch_lines_and_defaults", "tests/test_batch.py::test_a_bad_batch_file_queues_nothing",
          "tests/test_batch.py::test_ten_thousand_lines_check_quickly_and_too_many_queue_nothing")

TARGETS: tuple[Target, ...] = (
    Target("checkpoints", "threedgen/checkpoints.py", ("*",), T_CKPT, "checkpoints"),
    Target("checkpoint callbacks", "threedgen/callbacks.py", ("SafeCheckpoint", "RunFolderCheckpointIO"),
           T_CKPT, "checkpoints"),
    Target("skip and rollback", "threedgen/system.py",
           ("_cpu_copy", "System.optimise", "System._finite", "System.state_finite", "System.remember_good_state",
            "System.roll_back", "System.on_save_checkpoint", "System.on_load_checkpoint",
            "System.on_train_batch_start"), T_CKPT, "skip/rollback"),
    Target("run folder, atomic writes", "threedgen/rundir.py", ("*",), T_OUT, "run folder"),
    Target("run failures", "threedgen/runner.py",
           ("run", "_fit", "_finish", "_try_status", "out_of_memory", "as_run_failure"), T_OUT, "run folder", 0.4),
    Target("schema checks", "threedgen/schema.py",
           ("check_int", "check_pair", "check_faces", "check_device", "clean_prompt", "CameraSamplerConfig.check",
            "RenderConfig.check", "LossConfig.check", "OptimizerConfig.check", "ExportConfig.check",
            "RunConfig.check"), T_CONFIG, "config", 0.3),
    Target("range and name errors", "threedgen/errors.py", ("check_range", "nearest", "unknown_name"), T_CONFIG,
           "config"),
    Target("config validation", "threedgen/config.py",
           ("escape_interpolation", "_escape_all", "_resolve_raw", "parse_overrides", "_check_keys", "_lookup",
            "_explain", "merge", "resolve_request", "load_run_config"), T_CONFIG, "config", 0.35),
    Target("CLI errors and exit codes", "threedgen/cli.py",
           ("_Parser", "_int_arg", "_cmd_run", "_cmd_export", "_cmd_eval", "_request", "main"),
           T_CONFIG + ("tests/test_checkpoints.py",), "CLI"),
    Target("auth", "webui/auth.py", ("*",), T_AUTH, "web", 0.25),
    Target("REST routes", "webui/rest.py", ("*",), T_AUTH, "web"),
    Target("job table", "threedgen/jobs/store.py", ("*",), T_JOBS, "jobs", 0.5),
)

# Operators: one realistic slip per site (a boundary off by one, a negated test, a swapped
# arithmetic operator, an exception type that no longer matches), not every operator pair.
OPERATORS = frozenset({
    "core/ReplaceBinaryOperator_Add_Sub", "core/ReplaceBinaryOperator_Sub_Add",
    "core/ReplaceBinaryOperator_Mul_Div", "core/ReplaceBinaryOperator_Div_Mul",
    "core/ReplaceBinaryOperator_FloorDiv_Div", "core/ReplaceBinaryOperator_Mod_FloorDiv",
    "core/ReplaceBinaryOperator_Pow_Mul", "core/ReplaceBinaryOperator_BitOr_BitAnd",
    "core/ReplaceBinaryOperator_BitAnd_BitOr", "core/ReplaceBinaryOperator_BitXor_BitOr",
    "core/ReplaceBinaryOperator_LShift_RShift", "core/ReplaceBinaryOperator_RShift_LShift",
    "core/ReplaceComparisonOperator_Eq_NotEq", "core/ReplaceComparisonOperator_NotEq_Eq",
    "core/ReplaceComparisonOperator_Lt_LtE", "core/ReplaceComparisonOperator_LtE_Lt",
    "core/ReplaceComparisonOperator_Gt_GtE", "core/ReplaceComparisonOperator_GtE_Gt",
    "core/ReplaceComparisonOperator_Is_IsNot", "core/ReplaceComparisonOperator_IsNot_Is",
    "core/ReplaceComparisonOperator_In_NotIn", "core/ReplaceComparisonOperator_NotIn_In",
    "core/ReplaceUnaryOperator_Not_Nothing", "core/ReplaceUnaryOperator_USub_Nothing",
    "core/AddNot", "core/ReplaceTrueWithFalse", "core/ReplaceFalseWithTrue",
    "core/ReplaceAndWithOr", "core/ReplaceOrWithAnd",
    "core/ReplaceBreakWithContinue", "core/ReplaceContinueWithBreak",
    "core/ExceptionReplacer", "core/NumberReplacer", "core/RemoveDecorator", "core/ZeroIterationForLoop",
})


@dataclass(frozen=True)
class Equivalent:
    module: str
    operator: str
    line: str  # the source line, stripped, as it reads before the mutation
    reason: str
    mutant: str = ""  # the line after the mutation, spaces left out; "": every mutant of the operator there


# Mutants that cannot change behaviour, with the reason (reviewed by hand; see BENCHMARKS.md).
EQUIVALENT: tuple[Equivalent, ...] = (
    Equivalent("threedgen/checkpoints.py", "core/ReplaceTrueWithFalse", "tmp.unlink(missing_ok=True)",
               "the glob lists only files that exist, and only the resuming process, the folder's one writer "
               "then, removes them"),
    Equivalent("threedgen/callbacks.py", "core/NumberReplacer", "self._last = -1",
               "on_train_start sets _last to the trainer's step before any batch ends, so the first value is "
               "never read"),
    Equivalent("threedgen/system.py", "core/AddNot", "if isinstance(value, dict):",
               "the state dicts it copies then fall through to copy.deepcopy, the same copy on the CPU (on a GPU "
               "the copy would stay in GPU memory: memory, not behaviour)"),
    Equivalent("threedgen/system.py", "core/AddNot", "if isinstance(value, (list, tuple)):",
               "lists and tuples only occur inside the dicts above and are deep-copied either way"),
    Equivalent("threedgen/system.py", "core/ReplaceTrueWithFalse", "opt.zero_grad(set_to_none=True)",
               "every parameter of these systems gets a gradient in every step, so zeroed and dropped gradients "
               "give the same updates"),
    Equivalent("threedgen/system.py", "core/ReplaceTrueWithFalse", '"undone)", file=sys.stderr, flush=True)',
               "sys.stderr is line-buffered and the message ends its line"),
    Equivalent("threedgen/system.py", "core/ReplaceAndWithOr",
               "values = [v for v in self.state_dict().values() if torch.is_tensor(v) and v.is_floating_point()]",
               "a state dict holds tensors only, and an integer tensor is always finite"),
    Equivalent("threedgen/runner.py", "core/ReplaceBinaryOperator_BitOr_BitAnd",
               'def run(cfg: Optional[RunConfig] = None, out: str | Path = "outputs", resume: str | Path | None = None,',
               "an annotation: the module has `from __future__ import annotations`, so it is never evaluated"),
    Equivalent("threedgen/runner.py", "core/ReplaceTrueWithFalse", "pl.seed_everything(cfg.seed, workers=True, verbose=False)",
               "the camera loader runs in the main process (num_workers=0): there are no loader workers to seed"),
    Equivalent("threedgen/runner.py", "core/ReplaceTrueWithFalse", "weights_only=True)",
               "choose_checkpoint has just loaded the same file with weights_only=True (refusing code); Lightning's "
               "second load of those bytes gives the same dict either way (kept as defence in depth)"),
    Equivalent("webui/auth.py", "core/ReplaceComparisonOperator_Gt_GtE", "if 128 * r * (n + p + 2) > MAX_SCRYPT_MEMORY:",
               "128·r·(N+p+2) never equals 2^28 exactly: N+p+2 would have to be a power of two, and with N a power "
               "of two and 3 <= p+2 <= 18 < N it is not (N = 2 or 4 give far less memory)"),
    Equivalent("webui/auth.py", "core/ReplaceBinaryOperator_Add_Sub", "memory = 128 * r * (n + p + 2)",
               "maxmem is only a ceiling, 1 MiB above what scrypt needs; 256·r bytes less of it changes nothing"),
    Equivalent("webui/auth.py", "core/NumberReplacer", "maxmem=memory + 2 ** 20)",
               "maxmem is only a ceiling: scrypt needs 128·r·(N+p+2) bytes, which `memory` already is"),
    Equivalent("webui/auth.py", "core/ExceptionReplacer", "except UserError as exc:",
               "read_auth strips each name and splits lines first, so check_username cannot refuse a name there"),
    Equivalent("webui/auth.py", "core/ReplaceComparisonOperator_LtE_Lt", "if len(self._failures) <= self.max_clients:",
               "at exactly the limit the extra trim removes only addresses with no failure in the window, which "
               "count as none anyway"),
    *(Equivalent("webui/rest.py", op, line, "only decides when expired headers are dropped from memory; an "
                 "expired header is checked again either way (memory, not behaviour)")
      for op, line in (("core/ReplaceComparisonOperator_Gt_GtE", "if len(self._verified) > 10_000:"),
                       ("core/AddNot", "if len(self._verified) > 10_000:"),
                       ("core/NumberReplacer", "if len(self._verified) > 10_000:"),
                       ("core/ReplaceComparisonOperator_Gt_GtE",
                        "self._verified = {k: t for k, t in self._verified.items() if t > now}"))),
    Equivalent("webui/rest.py", "core/NumberReplacer", "if self._verified.get(key, 0.0) > now:",
               "the default stands for a header never verified; a running server's monotonic clock is far above "
               "1 s, so 0, 1 and -1 all read as long expired"),
    Equivalent("threedgen/jobs/store.py", "core/NumberReplacer", "db = sqlite3.connect(self.path, timeout=30, isolation_level=None)",
               "the next statement sets busy_timeout=30000 on the connection, which replaces this timeout"),
    Equivalent("threedgen/jobs/store.py", "core/NumberReplacer", "restarts: int = 0",
               "a Job is only built from a table row, whose restarts column always has a value (default 0)"),
    Equivalent("threedgen/jobs/store.py", "core/NumberReplacer",
               """queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]""",
               "the row has one column: [0] and [-1] are the same"),
    Equivalent("threedgen/jobs/store.py", "core/ReplaceComparisonOperator_Lt_LtE", "while time.time() < end:",
               "the clock would have to read exactly `end` for one more look to happen"),
    Equivalent("webui/auth.py", "core/NumberReplacer",
               "if not (2 <= n <= 2 ** 20 and n & (n - 1) == 0) or not 1 <= r <= 64 or not 1 <= p <= 16:",
               "N = 2^21 needs 128·r·(2^21+p+2) > 256 MiB for every r >= 1, so the memory rule refuses it anyway",
               "ifnot(2<=n<=2**21andn&(n-1)==0)ornot1<=r<=64ornot1<=p<=16:"),
    Equivalent("threedgen/system.py", "core/ReplaceAndWithOr",
               'if "optimizers" not in state and saved:  # written before each part owned its optimizers',
               "a checkpoint that names its optimizers was written by this run's own layout, so the extra count "
               "check passes; and Lightning calls configure_optimizers after on_load_checkpoint, which makes the "
               "optimizers anew either way (checked by hand: the resume-after-rollback test passes on it)"),
    Equivalent("threedgen/rundir.py", "core/ZeroIterationForLoop",
               'for line in Path("/proc/self/status").read_text().splitlines():',
               "without the /proc line the fallback reads the same umask through os.umask"),
    *(Equivalent("threedgen/rundir.py", "core/NumberReplacer", "return int(line.split()[1], 8)",
                 "another field of the line fails to parse (IndexError, ValueError) and the fallback reads the same "
                 "umask through os.umask", mutant) for mutant in ("returnint(line.split()[2],8)",
                                                                  "returnint(line.split()[0],8)")),
    Equivalent("threedgen/rundir.py", "core/NumberReplacer", "mask = os.umask(0o022)",
               "the value set for a moment is the one replaced right after; the mask read and restored is the "
               "process's own either way"),
    Equivalent("threedgen/rundir.py", "core/AddNot", 'if line.startswith("Umask:"):',
               "the first line that is not the umask fails to parse as octal, and the fallback then reads the "
               "same umask through os.umask"),
)

PYTEST = ("-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly")


# ---- scope -------------------------------------------------------------------------------------
def _definitions(source: str) -> list[tuple[str, int, int]]:
    """(qualified name, first line, last line) of every function and class, decorators included."""
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                out.append((name, first, child.end_lineno))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return out


def innermost(definitions, line: int) -> str | None:
    """The qualified name of the innermost function or class around ``line``; None at module level."""
    inside = [(name, first) for name, first, last in definitions if first <= line <= last]
    return max(inside, key=lambda d: d[1])[0] if inside else None


def in_scope(target: Target, definitions, line: int) -> bool:
    if target.scope == ("*",):
        return True
    name = innermost(definitions, line)
    return name is not None and any(name == s or name.startswith(s + ".") for s in target.scope)


def sampled(target: Target, mutation) -> bool:
    """Whether the mutant is in the target's sample: a hash of the module, operator and occurrence
    below ``sample``, the same choice on every machine and every run."""
    key = f"{target.module}:{mutation.operator_name}:{mutation.occurrence}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) < target.sample * 16 ** 8


def _diff_lines(diff: str) -> tuple[str, str]:
    """(the original line, the mutated line) of a one-line mutant's diff, each stripped."""
    before = [line[1:].strip() for line in (diff or "").splitlines() if line.startswith("-") and not line.startswith("---")]
    after = [line[1:].strip() for line in (diff or "").splitlines() if line.startswith("+") and not line.startswith("+++")]
    return (before[0] if before else ""), (after[0] if after else "")


def _equivalent(target: Target, operator: str, diff: str) -> str | None:
    """The reason a mutant (by its diff) is equivalent, from ``EQUIVALENT``; None if it is not listed."""
    before, after = _diff_lines(diff)
    for eq in EQUIVALENT:
        if (eq.module == target.module and eq.operator == operator and eq.line == before
                and (not eq.mutant or eq.mutant == "".join(after.split()))):
            return eq.reason
    return None


def _source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---- the tree the mutants are applied to --------------------------------------------------------
PACKAGE_DIRS = ("guidance", "representations", "webui", "configs")  # pyproject's package-dir mapping


def sync_tree(tree: Path, rev: str | None = None) -> None:
    """Copy the checkout's files (tracked and untracked, not ignored; or those of commit ``rev``)
    into ``tree``; make ``threedgen.webui`` etc. importable from it (``PYTHONPATH=tree``) as the
    package-dir mapping makes them in an install."""
    source = ROOT
    if rev is not None:  # the files of an earlier commit, e.g. the campaign before new tests
        source = tree.parent / "rev"
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    else:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
        files = [f for f in files if f and (ROOT / f).is_file()]
    tree.mkdir(parents=True, exist_ok=True)
    keep = set(files)
    for path in sorted(tree.rglob("*"), reverse=True):  # files that left the checkout, then empty folders
        rel = path.relative_to(tree).as_posix()
        if path.is_symlink() or path.is_file():
            if rel not in keep and not (path.is_symlink() and path.parent == tree / "threedgen"):
                path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    for rel in files:
        src, dst = source / rel, tree / rel
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for name in PACKAGE_DIRS:
        link = tree / "threedgen" / name
        if not link.is_symlink():
            link.symlink_to(Path("..") / name)


def child_env(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("THREEDGEN_DEVICE", "cpu")
    return env


def pytest_args(target: Target, tree: Path) -> list[str]:
    """pytest's arguments for the target's tests that exist in ``tree`` (a list may name a file
    added later)."""
    return [*PYTEST, *[t for t in target.tests if (tree / t.split("::")[0]).is_file()]]


# ---- the session ---------------------------------------------------------------------------------
def _db(workdir: Path):
    from cosmic_ray.work_db import WorkDB, use_db  # noqa: F401  (cosmic-ray: not a threedgen dependency)

    return use_db(str(workdir / "session.sqlite"), WorkDB.Mode.create)


def _meta_path(workdir: Path) -> Path:
    return workdir / "session.json"


def _load_meta(workdir: Path) -> dict:
    try:
        return json.loads(_meta_path(workdir).read_text())
    except (OSError, ValueError):
        return {}


def _save_meta(workdir: Path, meta: dict) -> None:
    _meta_path(workdir).write_text(json.dumps(meta, indent=1))


def make_mutants(target: Target, tree: Path):
    """Every in-scope mutant of ``target`` with a kept operator, as cosmic-ray work items."""
    from cosmic_ray.commands.init import _all_work_items

    definitions = _definitions((tree / target.module).read_text())
    for item in _all_work_items([tree / target.module], {}):
        mutation = item.mutations[0]
        if mutation.operator_name in OPERATORS and in_scope(target, definitions, mutation.start_pos[0]) \
                and sampled(target, mutation):
            yield item


def prepare(workdir: Path, targets: list[Target]) -> None:
    """Make the mutants of every target whose source changed since its mutants were made."""
    from cosmic_ray.work_item import WorkItem

    tree = workdir / "tree"
    meta = _load_meta(workdir)
    modules = meta.setdefault("modules", {})
    with _db(workdir) as db:
        for target in targets:
            digest = _source_hash(tree / target.module) + ":" + hashlib.sha256(
                repr((target.scope, target.sample, sorted(OPERATORS))).encode()).hexdigest()[:8]
            if modules.get(target.name, {}).get("digest") == digest:
                continue
            _delete(db, modules.get(target.name, {}).get("jobs", []))
            items = [WorkItem.single(job_id=f"{uuid.uuid4().hex}", mutation=w.mutations[0])
                     for w in make_mutants(target, tree)]
            db.add_work_items(items)
            modules[target.name] = {"digest": digest, "jobs": [w.job_id for w in items]}
            print(f"{target.name}: {len(items)} mutants", flush=True)
    _save_meta(workdir, meta)


def _delete(db, job_ids, results_only: bool = False) -> None:
    """Drop the jobs' results (and, unless ``results_only``, the jobs themselves) from the session."""
    if not job_ids:
        return
    from cosmic_ray.work_db import MutationSpecStorage, WorkItemStorage, WorkResultStorage

    models = (WorkResultStorage,) if results_only else (WorkResultStorage, MutationSpecStorage, WorkItemStorage)
    with db._session_maker.begin() as session:  # cosmic-ray keeps items, their mutations and results apart
        for model in models:
            session.query(model).filter(model.job_id.in_(list(job_ids))).delete(synchronize_session=False)


# ---- running the tests: forked from a process that imported the heavy libraries once --------------
PRELOAD = ("numpy", "scipy", "torch", "pytorch_lightning", "omegaconf", "trimesh", "PIL.Image", "imageio",
           "pytest", "_pytest.python")  # never a threedgen module: each mutant imports the mutated source


def preload() -> None:
    """Import the libraries every test process would import (about 6 s of each pytest start), so
    a forked child starts warm. Nothing of threedgen is imported here."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


def start_tests(target: Target, tree: Path, log: Path, threads: int = 0, tests=None, extra=()) -> int:
    """Fork a child that runs the target's tests (or ``tests``, node ids) in ``tree`` (its own
    session and process group, output to ``log``); returns its pid. Exit status 0: every test
    passed."""
    args = pytest_args(target, tree) if tests is None else [*PYTEST, *tests]
    args = [*args, *extra, f"--basetemp={log.with_suffix('.tmp')}"]  # pytest's own arguments
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: never returns
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(tree)
        os.environ.update(child_env(tree))
        if threads:  # several children share the cores
            import torch

            torch.set_num_threads(threads)
            os.environ["OMP_NUM_THREADS"] = str(threads)
        sys.path.insert(0, str(tree))
        sys.dont_write_bytecode = True
        import pytest

        code = pytest.main(list(args))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(99)


def poll_tests(pid: int, started: float, timeout: float) -> str | None:
    """'survived' | 'killed' for a child of :func:`start_tests` that ended, 'timeout' (its whole
    process group killed) for one past ``timeout`` seconds, None while it runs."""
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
    if time.monotonic() - started <= timeout:
        return None
    try:
        os.killpg(pid, 9)
    except OSError:
        pass
    os.waitpid(pid, 0)
    return "timeout"


def wait_tests(pid: int, timeout: float) -> tuple[str, float]:
    """(outcome, seconds) of a child from :func:`start_tests`, waiting for it."""
    started = time.monotonic()
    while (outcome := poll_tests(pid, started, timeout)) is None:
        time.sleep(0.05)
    return outcome, time.monotonic() - started


def baseline(target: Target, tree: Path, log: Path, workdir: Path) -> tuple[float, dict[str, list[str]]]:
    """Run the target's tests unmutated under coverage: (seconds, which tests run each function of
    the module, by qualified name). SystemExit if they fail (nothing to measure)."""
    data = workdir / f".coverage-{hashlib.sha256(target.name.encode()).hexdigest()[:8]}"
    data.unlink(missing_ok=True)
    os.environ["COVERAGE_FILE"] = str(data)  # inherited by the child
    try:
        outcome, seconds = wait_tests(start_tests(target, tree, log, extra=(
            f"--cov={tree}", "--cov-context=test", "--cov-report=", f"--junitxml={data}.xml")), 1800)
    finally:
        os.environ.pop("COVERAGE_FILE", None)
    if outcome != "survived":
        sys.exit(f"{target.name}: its tests fail without any mutant (see {log}):\n{log.read_text()[-3000:]}")
    import coverage

    cov = coverage.CoverageData(basename=str(data))
    cov.read()
    wanted = os.path.realpath(tree / target.module)
    by_line: dict[int, set] = {}
    for name in cov.measured_files():
        if os.path.realpath(name) == wanted:
            for line, contexts in (cov.contexts_by_lineno(name) or {}).items():
                by_line.setdefault(line, set()).update(c.split("|")[0] for c in contexts if c)
    import xml.etree.ElementTree as ET

    took = {}  # node id -> seconds, so that the quickest tests run first and a killed mutant stops soon
    for case in ET.parse(f"{data}.xml").iter("testcase"):
        path = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        took[f"{path}::{case.get('name')}"] = float(case.get("time") or 0)
    runs = {}
    for qualname, first, last in _definitions((tree / target.module).read_text()):
        tests = set().union(*[by_line.get(n, set()) for n in range(first, last + 1)])
        runs[qualname] = sorted(tests, key=lambda t: (took.get(t, 1e9), t))
    return seconds, runs


def tests_for(runs: dict[str, list[str]], definitions, line: int):
    """The node ids of the tests that run the function holding ``line`` (coverage of the unmutated
    run: a test that never runs the mutated code cannot see the mutant); None (the target's whole
    list) for code outside any function or run by no test in this process (a subprocess may)."""
    name = innermost(definitions, line)
    return (runs.get(name) or None) if name is not None else None


def execute(workdir: Path, targets: list[Target], minutes: float | None, retest_survivors: bool,
            jobs: int = 1, rev: str | None = None) -> None:
    """Test every mutant without a result, ``jobs`` at a time (each in its own copy of the tree),
    each against the target's tests that run the mutated function."""
    from cosmic_ray.mutating import apply_mutation
    from cosmic_ray.plugins import get_operator
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    trees = [workdir / "tree"] + [workdir / f"tree-{k}" for k in range(2, jobs + 1)]
    for tree in trees[1:]:
        sync_tree(tree, rev)
    meta = _load_meta(workdir)
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    preload()
    with _db(workdir) as db:
        results = dict(db.results)
        work = []  # (target, job id) in TARGETS order
        for target in targets:
            info = meta["modules"][target.name]
            if retest_survivors:
                again = [j for j in info["jobs"] if j in results and results[j].worker_outcome == WorkerOutcome.NORMAL
                         and results[j].test_outcome == TestOutcome.SURVIVED]
                _delete(db, again, results_only=True)
                for j in again:
                    results.pop(j)
            work += [(target, j) for j in info["jobs"] if j not in results]
        specs = {w.job_id: w.mutations[0] for w in db.work_items if w.job_id in {j for _, j in work}}
        timeouts = {}
        running = {}  # pid -> (slot, target, job, file, original text, diff)
        free = list(range(len(trees)))
        done = 0

        def finish(pid, outcome, seconds):
            nonlocal done
            slot, target, job, path, original, diff = running.pop(pid)
            path.write_text(original)
            free.append(slot)
            log = workdir / f"test-{slot}.log"
            output = "timeout" if outcome == "timeout" else log.read_text(errors="replace")[-4000:]
            db.set_result(job, WorkResult(worker_outcome=WorkerOutcome.NORMAL, output=output, diff=diff,
                                          test_outcome=TestOutcome.SURVIVED if outcome == "survived"
                                          else TestOutcome.KILLED))
            done += 1
            m = specs[job]
            print(f"  [{done}/{len(work)}] {outcome:8s} {seconds:5.1f}s {m.operator_name} {target.module}:"
                  f"{m.start_pos[0]}", flush=True)

        def reap(block: bool):
            while running and (block or not free):
                for pid in list(running):
                    started, limit = timeouts[pid]
                    outcome = poll_tests(pid, started, limit)
                    if outcome is not None:
                        finish(pid, outcome, time.monotonic() - started)
                if running and (block or not free):
                    time.sleep(0.05)
                if not block and free:
                    return

        seen = set()
        try:
            for target, job in work:
                if deadline is not None and time.monotonic() > deadline:
                    print("stopped at the time limit; run again to continue", flush=True)
                    break
                info = meta["modules"][target.name]
                if target.name not in seen:
                    seen.add(target.name)
                    reap(block=True)  # the baseline runs alone, on unmutated trees
                    seconds, runs = baseline(target, trees[0], workdir / "test-0.log", workdir)
                    info["baseline_s"] = round(seconds, 1)
                    definitions = _definitions((trees[0] / target.module).read_text())  # once per target
                    _save_meta(workdir, meta)
                    pending = sum(1 for t, _ in work if t is target)
                    print(f"{target.name}: {pending} mutants to test (its tests: {info['baseline_s']} s unmutated)",
                          flush=True)
                mutation = specs[job]
                reap(block=False)
                slot = free.pop(0)
                tree = trees[slot]
                path = tree / target.module
                original = path.read_text()
                operator = get_operator(mutation.operator_name)(**(mutation.operator_args or {}))
                _, mutated = apply_mutation(path, operator, mutation.occurrence)
                diff = _diff(original, mutated, target.module) if mutated is not None else ""
                reason = _equivalent(target, mutation.operator_name, diff)
                if mutated is None or reason is not None:
                    path.write_text(original)
                    free.append(slot)
                    db.set_result(job, WorkResult(worker_outcome=WorkerOutcome.SKIPPED if reason else
                                                  WorkerOutcome.NO_TEST, output=f"equivalent: {reason}", diff=diff))
                    continue
                pid = start_tests(target, tree, workdir / f"test-{slot}.log", threads=1 if jobs > 1 else 0,
                                  tests=tests_for(runs, definitions, mutation.start_pos[0]))
                timeouts[pid] = (time.monotonic(), max(45.0, 2 * jobs * info["baseline_s"] + 20))
                running[pid] = (slot, target, job, path, original, diff)
            reap(block=True)
        finally:
            for pid, (slot, target, job, path, original, diff) in list(running.items()):
                try:
                    os.killpg(pid, 9)
                    os.waitpid(pid, 0)
                except OSError:
                    pass
                path.write_text(original)


def _diff(before: str, after: str, name: str) -> str:
    import difflib

    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), name, name, n=1))


# ---- reporting -----------------------------------------------------------------------------------
def tally(workdir: Path, targets: list[Target]) -> list[dict]:
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    meta = _load_meta(workdir)
    with _db(workdir) as db:
        results = dict(db.results)
        operators = {w.job_id: w.mutations[0].operator_name for w in db.work_items}
    rows = []
    for target in targets:
        jobs = meta.get("modules", {}).get(target.name, {}).get("jobs", [])
        row = {"name": target.name, "module": target.module, "group": target.group, "mutants": len(jobs),
               "killed": 0, "survived": 0, "equivalent": 0, "timeout": 0, "not run": 0}
        for job in jobs:
            r = results.get(job)
            if r is None:
                row["not run"] += 1
            elif r.worker_outcome == WorkerOutcome.SKIPPED:
                row["equivalent"] += 1
            elif r.worker_outcome == WorkerOutcome.NO_TEST:
                row["equivalent"] += 1
            elif r.test_outcome == TestOutcome.SURVIVED and _equivalent(target, operators[job], r.diff):
                row["equivalent"] += 1
            elif r.test_outcome == TestOutcome.SURVIVED:
                row["survived"] += 1
            elif r.output == "timeout":
                row["timeout"] += 1
            else:
                row["killed"] += 1
        rows.append(row)
    return rows


def _score(rows) -> str:
    killed = sum(r["killed"] + r["timeout"] for r in rows)  # a mutant that hangs the tests is caught
    judged = killed + sum(r["survived"] for r in rows)
    return f"{100 * killed / judged:.0f} %" if judged else "-"


def report(workdir: Path, targets: list[Target], markdown: bool) -> str:
    rows = tally(workdir, targets)
    head = ["target", "module", "mutants", "killed", "survived", "equivalent", "timeout", "not run", "score"]
    body = [[r["name"], r["module"], r["mutants"], r["killed"], r["survived"], r["equivalent"], r["timeout"],
             r["not run"], _score([r])] for r in rows]
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for g, rs in groups.items():
        body.append([f"**{g}**" if markdown else f"[{g}]", "", *[sum(r[k] for r in rs) for k in
                     ("mutants", "killed", "survived", "equivalent", "timeout", "not run")], _score(rs)])
    body.append(["**all**" if markdown else "[all]", "", *[sum(r[k] for r in rows) for k in
                 ("mutants", "killed", "survived", "equivalent", "timeout", "not run")], _score(rows)])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(f"`{c}`" if i == 1 and c else str(c) for i, c in enumerate(b)) + " |"
                  for b in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [head, *body])


def survivors(workdir: Path, targets: list[Target]) -> str:
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    meta = _load_meta(workdir)
    out = []
    with _db(workdir) as db:
        results = dict(db.results)
        specs = {w.job_id: w.mutations[0] for w in db.work_items}
    for target in targets:
        for job in meta.get("modules", {}).get(target.name, {}).get("jobs", []):
            r = results.get(job)
            if r and r.worker_outcome == WorkerOutcome.NORMAL and r.test_outcome == TestOutcome.SURVIVED:
                m = specs[job]
                if _equivalent(target, m.operator_name, r.diff):
                    continue
                out.append(f"### {target.name} {m.operator_name} line {m.start_pos[0]} (job {job})\n{r.diff}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "report", "survivors", "count"])
    parser.add_argument("--only", nargs="*", default=None, help="target names (see TARGETS), default all")
    parser.add_argument("--workdir", default=str(ROOT / ".mutation"))
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long (run again to go on)")
    parser.add_argument("--retest-survivors", action="store_true")
    parser.add_argument("--rev", default=None, help="test the files of this commit instead of the checkout's "
                        "(e.g. the campaign before new tests)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once, each in its own tree copy")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    names = {t.name for t in TARGETS}
    unknown = set(args.only or ()) - names
    if unknown:
        parser.error(f"unknown target(s) {sorted(unknown)}; targets: {sorted(names)}")
    targets = [t for t in TARGETS if args.only is None or t.name in args.only]
    workdir = Path(args.workdir).resolve()
    if args.command in ("run", "count"):
        try:
            import cosmic_ray  # noqa: F401
        except ImportError:
            parser.error("needs cosmic-ray: pip install cosmic-ray")
        import fcntl

        workdir.mkdir(parents=True, exist_ok=True)
        lock = open(workdir / "lock", "w")
        try:  # one campaign at a time: a second would copy the checkout over a mutant under test
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            parser.error(f"another campaign is running in {workdir}")
        sync_tree(workdir / "tree", args.rev)
        prepare(workdir, targets)
        if args.command == "run":
            started = time.monotonic()
            execute(workdir, targets, args.minutes, args.retest_survivors, args.jobs, args.rev)
            print(f"campaign: {time.monotonic() - started:.0f} s this time", flush=True)
    if args.command == "survivors":
        print(survivors(workdir, targets))
    else:
        print(report(workdir, targets, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
