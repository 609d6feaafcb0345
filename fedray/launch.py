"""``python -m fedray.launch [hydra overrides]``: compose the config, check it, run the job.

Errors a user can fix (bad config, bad override syntax, bad data, unreachable cluster)
print one ``fedray: error:`` line and exit with status 2, whichever layer (Hydra or
fedray) found them; set HYDRA_FULL_ERROR=1 to see the traceback instead.

``hydra.run.dir=OLD resume=true`` continues the run in OLD with the config saved in
``OLD/.hydra/config.yaml``. Overrides that would change what its checkpoint means are
refused; Hydra is told not to rewrite OLD's ``.hydra/`` record. Ctrl-C finishes the round
in flight, writes a checkpoint, and prints one line with the command that resumes.

What the job prints (progress lines, errors, its clients' forwarded output) also goes into
Hydra's job log in the run directory (``launch.log``), beside its log records. A run that
fails before writing anything of its own there (only Hydra's ``.hydra/`` record and that
log) leaves no run directory behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedray.config import RESUME_SAFE_KEYS, check_override_key, register_configs, to_config
from fedray.errors import ConfigError, FedrayError

register_configs()

# What the user asked for; cli() sets HYDRA_FULL_ERROR=1 itself to catch Hydra's errors.
_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"
EXIT_USAGE = 2  # every error a user can fix
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
# Values that are file paths: a bash-pasted `dataset.path=data/site_{client_id}.csv`
# lost its quotes to the shell, so it is quoted for Hydra's grammar here.
_PATH_KEYS = ("dataset.path", "dataset.test_path", "checkpoint.path")
_TRUE = ("true", "yes", "on", "1")


def _fail(exc: BaseException) -> None:
    if _FULL_ERROR:
        raise exc
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"fedray: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def _parse(override: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override)


def _hydra_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def prepare_overrides(args: list[str]) -> list[str]:
    """Check command-line overrides before Hydra sees them; return the ones to pass on.

    - a value with ``{client_id}`` (or any path key's value) that Hydra's grammar rejects
      because the shell ate its quotes is quoted again;
    - a grammar error names the override;
    - a key that is not in the schema is refused, also with ``+``, suggesting the nearest;
    - ``resume=true`` with ``hydra.run.dir`` tells Hydra not to rewrite that run's record.
    """
    out: list[str] = []
    keys: dict[str, object] = {}
    for arg in args:
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            out.append(arg)  # Hydra's own flags (-m, --cfg job, ...)
            continue
        try:
            parsed = _parse(arg)
        except Exception as exc:
            raw_key, _, value = arg.partition("=")
            key = raw_key.lstrip("+~")
            fixed = None
            if (key in _PATH_KEYS or "{client_id}" in value) and not value.startswith(("'", '"')):
                fixed = f"{raw_key}={_hydra_quote(value)}"
                try:
                    parsed = _parse(fixed)
                except Exception:
                    fixed = None
            if fixed is None:
                reason = " ".join(str(exc).split())
                raise ConfigError(
                    f"cannot parse the override {arg!r}: {reason} (quote a value with "
                    "special characters for Hydra, e.g. 'key=\"a{b}\"')"
                ) from None
            arg = fixed
        key = parsed.key_or_group
        if key.split(".")[0].split("/")[0] != "hydra" and "/" not in key:  # Hydra checks those
            problem = check_override_key(key)
            if problem:
                raise ConfigError(f"override {arg!r}: {problem}")
        keys[key] = parsed.value() if not parsed.is_delete() else None
        out.append(arg)
    resume = str(keys.get("resume", "")).lower() in _TRUE
    if resume and "hydra.run.dir" in keys and "hydra.output_subdir" not in keys:
        out.append("hydra.output_subdir=null")  # keep the old run's .hydra/ as it was
    return out


def _same(a, b) -> bool:
    def plain(x):
        return OmegaConf.to_container(x, resolve=False) if OmegaConf.is_config(x) else x

    return plain(a) == plain(b)


def _shown(value) -> str:
    if OmegaConf.is_dict(value) and "name" in value:
        return str(value.name)  # a config group: its option
    if OmegaConf.is_config(value):
        return str(OmegaConf.to_container(value, resolve=False))
    return repr(value) if isinstance(value, str) else str(value)


def _resume_config(
    raw: DictConfig, run_dir: Path, task_overrides: list[str], own_record: bool = False
) -> DictConfig:
    """The saved config of the run being resumed, with only harmless overrides applied.

    The run is the one that holds the checkpoint: the folder above its checkpoints folder
    when ``checkpoint.path`` names one (``RUN/checkpoints``, its ``latest`` or a
    ``round_NNNNN`` folder in it), else ``run_dir`` (``hydra.run.dir=OLD``). Its record is
    ``.hydra/config.yaml`` there; ``own_record``: Hydra wrote ``run_dir``'s record for
    this command (no ``hydra.run.dir``), so it is not the old run's. A resume without a
    record is refused where there is a checkpoint (the command line would silently
    replace the run's config); without a checkpoint the driver says there is none.
    ``checkpoint.path`` itself may be passed: it says where the checkpoint is."""
    from fedray.runtime.outputs import checkpoint_folder, checkpoints_dir_of

    path = raw.checkpoint.path
    checkpoints = checkpoints_dir_of(Path(str(path))) if path is not None else None
    sources = [checkpoints.parent] if checkpoints is not None else []
    if not own_record and run_dir not in sources:
        sources.append(run_dir)
    record = next(
        (s / ".hydra" / "config.yaml" for s in sources if (s / ".hydra" / "config.yaml").is_file()),
        None,
    )
    if record is None:
        where = Path(str(path)) if path is not None else run_dir / "checkpoints"
        if checkpoint_folder(where) is None:
            return raw  # the driver says there is no checkpoint
        looked = " or ".join(str(s / ".hydra" / "config.yaml") for s in sources) or "(none)"
        raise ConfigError(
            f"resume=true continues a run with its own saved config, and there is none at "
            f"{looked}; pass hydra.run.dir=<the old run's directory> (it holds .hydra/ and "
            "checkpoints/), or resume from Python with run_experiment and the run's config"
        )
    source = record.parent.parent
    saved = OmegaConf.load(record)
    changed, safe = [], []
    for override in task_overrides:
        key = _parse(override).key_or_group
        if key == "resume":
            continue
        if key in RESUME_SAFE_KEYS or key.split(".")[0] in RESUME_SAFE_KEYS:
            safe.append(key)
            continue
        if key == "checkpoint.path":  # where the checkpoint is, not what it means
            safe.append(key)
            continue
        old = OmegaConf.select(saved, key, default=None)
        if not _same(OmegaConf.select(raw, key, default=None), old):
            changed.append(f"{key} (saved: {_shown(old)})")
    if changed:
        raise ConfigError(
            f"resume=true continues the run in {source} with its saved config; these overrides "
            f"would change what its checkpoint means: {', '.join(changed)}. Allowed on resume: "
            f"{', '.join(k + '.*' if k == 'ray' else k for k in sorted(RESUME_SAFE_KEYS))}, "
            "checkpoint.path; start a new run (another hydra.run.dir) to change the others"
        )
    for key in safe:
        OmegaConf.update(saved, key, OmegaConf.select(raw, key), force_add=True)
    saved.resume = True
    return saved


def _shell_path(path: str | Path) -> str:
    rel = os.path.relpath(path)
    return shlex.quote(rel if not rel.startswith("..") else str(path))


def _resume_safe(overrides: list[str], checkpoints: Path | None = None) -> list[str]:
    """The overrides a resume takes (``rounds=40``, ``ray.*``...), in the order given,
    and ``checkpoint.path=CHECKPOINTS`` (the folder, so that the next resume starts from
    its newest checkpoint) when this resume named one.

    A resume does not rewrite the run's saved config, so whatever a resume changed
    (``rounds=40`` extending a finished run) must be passed again on the next resume."""
    keys = [(_parse(o).key_or_group, o) for o in overrides]
    again = [o for k, o in keys if k in RESUME_SAFE_KEYS or k.split(".")[0] in RESUME_SAFE_KEYS]
    if checkpoints is not None and any(k == "checkpoint.path" for k, _ in keys):
        again.append(f"checkpoint.path={_shell_path(checkpoints)}")
    return again


def _interrupted(run_dir: Path, checkpoint_path: str | None, again: list[str] = ()) -> None:
    """One line: the last checkpoint on disk and the command that resumes from it, with
    ``again``: the overrides of this resume that the saved config lacks."""
    from fedray.runtime.outputs import checkpoints_dir_of, latest_checkpoint_round

    directory = (
        checkpoints_dir_of(Path(checkpoint_path)) if checkpoint_path else run_dir / "checkpoints"
    )
    last = latest_checkpoint_round(directory)
    if last is None:
        print(
            f"fedray: interrupted before the first checkpoint; nothing to resume in {run_dir}",
            file=sys.stderr,
            flush=True,
        )
    else:
        command = (
            f"{_shell_path(sys.executable)} -m fedray.launch "
            f"hydra.run.dir={_shell_path(run_dir)} resume=true"
            + "".join(f" {shlex.quote(o)}" for o in again)
        )
        print(
            f"fedray: interrupted; last checkpoint: round {last} in {_shell_path(directory)}; "
            f"resume with: {command}",
            file=sys.stderr,
            flush=True,
        )
    sys.exit(EXIT_INTERRUPTED)


# Ray colours its forwarded lines ("(ClientHost pid=...)"); the log file keeps the text.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Tee:
    """A console stream (sys.stdout or sys.stderr) that also writes into the job log,
    through its handler's stream and lock, so printed lines and log records stay in order.
    Writing the log never fails the console."""

    def __init__(self, console, handler: logging.FileHandler) -> None:
        self._console, self._handler = console, handler

    def write(self, text: str) -> int:
        written = self._console.write(text)
        self._handler.acquire()
        try:
            if self._handler.stream is not None:
                self._handler.stream.write(_ANSI.sub("", text))
                self._handler.stream.flush()
        except (OSError, ValueError):
            pass  # the file is gone or closed: the console still has it
        finally:
            self._handler.release()
        return written

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._console.flush()

    def __getattr__(self, name: str):
        return getattr(self._console, name)


def _job_log(run_dir: Path) -> logging.FileHandler | None:
    """Hydra's job log in ``run_dir`` (``launch.log``), if its logging config has one
    (``hydra/job_logging=stdout`` or ``disabled`` has none)."""
    here = run_dir.resolve()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == here:
            return handler
    return None


@contextlib.contextmanager
def _console_into(handler: logging.FileHandler | None):
    """While the job runs, what it prints also goes into the job log."""
    if handler is None:
        yield
        return
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(stdout, handler), _Tee(stderr, handler)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr


# What Hydra writes into a run directory before the job starts.
_HYDRA_RECORD = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def _remove_unused_run_dir(run_dir: Path, hc, handler: logging.FileHandler | None) -> bool:
    """Remove ``run_dir`` after a failed start: only when Hydra made its record there for
    this command and it holds nothing else but the job log (a checkpoint, metrics, or any
    file of the user's keep it, as does a resume into an old run); never the directory
    the command was started in, nor one above it. Returns whether it was removed."""
    if hc.output_subdir is None:  # resume into hydra.run.dir=OLD: the old run's directory
        return False
    record = run_dir / str(hc.output_subdir)
    log_name = Path(handler.baseFilename).name if handler is not None else f"{hc.job.name}.log"
    try:
        here, started_in = run_dir.resolve(), Path(hc.runtime.cwd).resolve()
        if here == started_in or here in started_in.parents or not record.is_dir():
            return False
        if {p.name for p in run_dir.iterdir()} - {record.name, log_name}:
            return False
        if (
            any(p.is_dir() for p in record.iterdir())
            or {p.name for p in record.iterdir()} - _HYDRA_RECORD
        ):
            return False
    except OSError:
        return False
    if handler is not None:  # Hydra's handler would write into the removed file
        logging.getLogger().removeHandler(handler)
        handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    return not run_dir.exists()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> float | None:
    """Hydra entry point; returns the final accuracy (for sweepers)."""
    logging.getLogger("fedray").setLevel(logging.INFO)
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    handler = _job_log(run_dir)
    finished = False
    try:
        with _console_into(handler):
            accuracy = _run(raw, hc, run_dir)
        finished = True
        return accuracy
    finally:
        if not finished:
            _remove_unused_run_dir(run_dir, hc, handler)


def _run(raw: DictConfig, hc, run_dir: Path) -> float | None:
    """The job in ``run_dir``; a user's error is one line and exit 2, Ctrl-C exit 130."""
    checkpoint_path = raw.checkpoint.path
    try:
        if raw.resume:
            own_record = hc.output_subdir is not None  # Hydra wrote run_dir/.hydra for us
            raw = _resume_config(raw, run_dir, list(hc.overrides.task), own_record)
            checkpoint_path = raw.checkpoint.path
        cfg = to_config(raw)  # checked before Ray starts
        from fedray.runtime.cluster import check_address

        if not cfg.resume:  # a resume checks its checkpoint and ledger first (driver)
            check_address(cfg)  # a silent ray.address: one line in seconds, before torch loads
        from fedray.runtime.driver import run_experiment

        summary = run_experiment(cfg, run_dir)
    except FedrayError as exc:
        _fail(exc)
        return None
    except KeyboardInterrupt:
        if _FULL_ERROR:
            raise
        again = []
        if raw.resume:
            from fedray.runtime.outputs import checkpoints_dir_of

            named = Path(str(checkpoint_path)) if checkpoint_path else None
            again = _resume_safe(list(hc.overrides.task), named and checkpoints_dir_of(named))
        _interrupted(run_dir, checkpoint_path, again)
        return None
    return summary["final_accuracy"]


def _is_config_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, HydraException | OmegaConfBaseException)


def cli(argv: list[str] | None = None) -> None:
    """Check the overrides, then run Hydra; Hydra's config errors become one line, exit 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        sys.argv = [sys.argv[0], *prepare_overrides(args)]
    except ConfigError as exc:
        _fail(exc)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; we report
    try:
        main()
    except KeyboardInterrupt:  # before the job started (imports, Hydra set-up)
        if _FULL_ERROR:
            raise
        print("fedray: interrupted before the job started", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if _FULL_ERROR or not _is_config_error(exc):
            raise
        _fail(ConfigError(_hydra_message(exc)))


def _hydra_message(exc: BaseException) -> str:
    """Hydra's or OmegaConf's error as one line (with its cause, without search paths)."""
    text = str(exc).split("Config search path:")[0]
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip():
        text += ": " + str(cause).strip().splitlines()[0]
    return " ".join(text.split())


if __name__ == "__main__":
    cli()
