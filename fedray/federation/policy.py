"""A site's own policy: what it runs, for whom, how much, and how much privacy it spends.

Across organisations a site decides what it does from its own policy file, never from
the coordinator's word. The coordinator may only *name* things (a task id and version,
a round, hyper-parameter values, a model fingerprint); the site checks each against its
policy and either goes ahead or refuses with one clear line (:class:`PolicyRefusal`), the
line it logs and the one the coordinator is told.

The policy says:

* ``tasks``: the task ids and versions the site runs, each mapped by the *site* to an
  importable class installed at the site, and the model it accepts for that task (a
  fingerprint of the exchanged parameters' names, dtypes and shapes,
  :func:`model_fingerprint`). No code and no class name ever comes from the wire.
* ``max_rounds``: the most rounds the site takes part in (distinct rounds it trains in
  or approves a sum of, counted in its ledger); a round at or before the last one it
  completed (approved a sum of) is refused.
* ``hyperparameters``: for each key a request may set, ``min``/``max`` (and an optional
  ``default`` used when a request leaves the key out); a key not listed is refused.
* ``min_sum``: the smallest sum the site's key holder helps open (``clients``, ``sites``);
  a sum holding any of the site's own clients must hold at least ``clients -
  max_colluding_clients`` of them (only their noise is the site's to trust).
* ``privacy``: the site's DP settings and its own budget ``max_epsilon_vs_server``, with
  its own accountant (fedray's, :mod:`fedray.privacy.dp`) counting the releases the site
  signed. Noise always comes from the OS CSPRNG at the site (no seeded noise here).
* ``max_upload_bytes``: the largest update the site sends.

Load it with :func:`load_policy` (YAML); every error is one line naming the key and, where
there is a choice, the allowed values. Unknown keys are refused.

The release ledger (``privacy.ledger``): every sum the site approves is a release of its
clients' updates, counted once per approval statement (a digest of the key, the round
and the sorted update ids, computed here) and written to the ledger before the approval
leaves the site, so a restarted site cannot reset the count. With a budget the ledger is
required: an absolute path, or one relative to the policy file's directory. A missing
ledger is an error unless the site says it starts a new one (``privacy.new_ledger:
true`` or ``load_policy(..., new_ledger=True)``); creating one also writes
``<ledger>.created``, so a ledger lost later is an error even then. Writes are under an
exclusive lock (``<ledger>.lock``), re-read before they change anything, replaced
atomically and fsynced with their directory, so two processes on one ledger lose nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedray.errors import ConfigError, FedrayError
from fedray.federation.messages import ID_RE, VERSION_RE

PRIVACY_MODES = ("client", "sample", "none")
ACCOUNTANTS = ("rdp", "pld")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_ID = ID_RE  # what the wire accepts (messages.check_id): no dots, at most 64
_VERSION = VERSION_RE  # digits and dots, as the wire's task_version
_MAX_ROUND = 2**63 - 1
APPROVAL_DOMAIN = "fedray-site-release-v1"


class PolicyError(ConfigError):
    """The site's policy file is invalid: one line naming the key and the allowed values."""


class PolicyRefusal(FedrayError, PermissionError):
    """A request the site's policy does not allow: one clear line, logged at the site and
    told to the coordinator. Nothing of the site's data, update or key share goes out."""


# -- model fingerprint ----------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str:
    name = str(dtype)
    return name[len("torch.") :] if name.startswith("torch.") else name


def model_fingerprint(model: Any, trainable: list[str] | None = None) -> str:
    """SHA-256 (hex) of the sorted (name, dtype, shape) of the exchanged parameters.

    ``model`` is a :class:`fedray.models.ParamView`, a ``torch.nn.Module`` (its exchanged
    parameters as a ParamView would choose them: ``trainable`` prefixes, else those that
    require gradients), or an iterable of ``(name, dtype, shape)``. Values do not enter:
    the fingerprint says which model, not which weights.
    """
    entries: list[tuple[str, str, tuple[int, ...]]]
    if hasattr(model, "names") and hasattr(model, "params"):  # a ParamView
        entries = [
            (n, _dtype_name(p.dtype), tuple(p.shape))
            for n, p in zip(model.names, model.params, strict=True)
        ]
    elif hasattr(model, "named_parameters"):  # a torch module
        named = list(model.named_parameters())
        if trainable:
            named = [(n, p) for n, p in named if any(n.startswith(t) for t in trainable)]
        else:
            named = [(n, p) for n, p in named if p.requires_grad]
        entries = [(n, _dtype_name(p.dtype), tuple(p.shape)) for n, p in named]
    else:
        entries = [(str(n), _dtype_name(d), tuple(int(s) for s in shape)) for n, d, shape in model]
    canonical = json.dumps(
        [[n, d, list(s)] for n, d, s in sorted(entries)], separators=(",", ":")
    ).encode()
    return hashlib.sha256(canonical).hexdigest()


# -- the request a coordinator sends --------------------------------------------------------


@dataclass(frozen=True)
class TrainRequest:
    """What a coordinator asks of a site for one round (filled by the channel layer from
    a typed message). The site checks all of it against its policy before anything runs."""

    round: int
    task_id: str
    task_version: str
    model_fingerprint: str | bytes  # hex, or the 32 raw bytes of the SHA-256
    hyperparameters: Mapping[str, float | int] = field(default_factory=dict)
    upload_bytes: int = 0  # the size of the update the coordinator expects back


# -- the policy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskEntry:
    """A task the site runs: the id and version a coordinator may name, the class the
    site installed for it, and the model (fingerprint) it accepts for it."""

    id: str
    version: str
    class_path: str
    model_fingerprint: str


@dataclass(frozen=True)
class Range:
    """Allowed values of one hyper-parameter (both ends included). Integer-valued when
    both ends are integers."""

    min: float | int
    max: float | int
    default: float | int | None = None

    @property
    def integer(self) -> bool:
        return isinstance(self.min, int) and isinstance(self.max, int)


@dataclass(frozen=True)
class MinSum:
    """The smallest sum the site's key holder helps open."""

    clients: int
    sites: int


@dataclass(frozen=True)
class PrivacyPolicy:
    """The site's DP settings and its own budget against the server."""

    mode: str = "client"  # client (distributed noise under encryption) | sample | none
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    max_epsilon_vs_server: float | None = None
    accountant: str = "rdp"
    max_colluding_clients: int = 0
    examples: int | None = None  # sample mode: the site's training examples
    ledger: str | None = None  # JSON file of the releases the site signed (absolute)
    new_ledger: bool = False  # the site starts a new ledger (else a missing one is an error)


@dataclass
class SitePolicy:
    """A site's validated policy and its privacy ledger (see the module docstring)."""

    tasks: tuple[TaskEntry, ...]
    max_rounds: int
    hyperparameters: Mapping[str, Range]
    min_sum: MinSum
    privacy: PrivacyPolicy
    max_upload_bytes: int
    site: str = "site"
    # The site sends each update no sooner than this after the request came (0: at once),
    # so when it answers does not tell how its clients' training went.
    answer_after_s: float = 0.0

    def __post_init__(self) -> None:
        self._dp = _build_accountant(self)
        # Releases the site signed: (round, approval digest), in order; the rounds it took
        # part in (trained in or approved a sum of).
        self._releases: list[tuple[int, str]] = []
        self._rounds: set[int] = set()
        with self._ledger_lock():
            if self.privacy.ledger and not os.path.exists(self.privacy.ledger):
                self._create_ledger()
            self._reload()

    @property
    def last_completed_round(self) -> int:
        """The latest round the site approved a sum of (0 before any)."""
        return max((r for r, _ in self._releases), default=0)

    @property
    def rounds_taken_part(self) -> int:
        return len(self._rounds)

    def _check_participation(self, rnd: int, what: str) -> None:
        last = self.last_completed_round
        if rnd <= last:
            raise PolicyRefusal(
                f"round {rnd}: this site already completed round {last} (approved its sum); "
                f"it does not {what} a round at or before it"
            )
        if rnd not in self._rounds and len(self._rounds) >= self.max_rounds:
            raise PolicyRefusal(
                f"round {rnd}: this site took part in {len(self._rounds)} rounds, its "
                f"max_rounds={self.max_rounds}; it takes part in no more"
            )

    # -- requests ---------------------------------------------------------------------------
    def check_request(self, request: TrainRequest) -> None:
        """Refuse (PolicyRefusal, one line) a train request this site's policy does not
        allow; return None to go ahead. Going ahead counts the round as one the site takes
        part in (written to the ledger before this returns)."""
        rnd = _check_round(request.round)
        task = self.task_for(request.task_id, request.task_version, rnd)
        fp = request.model_fingerprint
        if isinstance(fp, bytes | bytearray):  # the wire's 32 raw bytes
            fp = bytes(fp).hex()
        if fp != task.model_fingerprint:
            raise PolicyRefusal(
                f"round {rnd}: model fingerprint {str(fp)[:16]!r} is not "
                f"the one this site accepts for task {task.id}@{task.version} "
                f"({task.model_fingerprint[:16]}...)"
            )
        self.resolve_hyperparameters(request)
        self.check_upload(request.upload_bytes, rnd)
        with self._ledger_lock():
            self._reload()
            self._check_participation(rnd, "train in")
            self._check_budget(rnd)
            if rnd not in self._rounds:
                self._rounds.add(rnd)
                self._save_ledger()

    def task_for(self, task_id: Any, version: Any, rnd: int | None = None) -> TaskEntry:
        """The site's entry for ``task_id`` at ``version``, or a refusal."""
        where = f"round {rnd}: " if rnd is not None else ""
        for t in self.tasks:
            if t.id == task_id and t.version == version:
                return t
        offered = ", ".join(f"{t.id}@{t.version}" for t in self.tasks)
        raise PolicyRefusal(
            f"{where}task {task_id!s:.64}@{version!s:.32} is not installed/allowed at this "
            f"site; it runs: {offered}"
        )

    def task_class(self, task_id: str, version: str) -> type:
        """The task class the *site* configured for this id and version, imported here."""
        from fedray.tasks.base import Task

        entry = self.task_for(task_id, version)
        module, _, name = entry.class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise PolicyRefusal(
                f"task {entry.id}@{entry.version}: {entry.class_path} is not a fedray Task "
                "installed at this site"
            )
        return cls

    def resolve_hyperparameters(self, request: TrainRequest) -> dict[str, float | int]:
        """The request's hyper-parameters, each checked against its range, with the
        policy's defaults for keys the request leaves out; a refusal otherwise."""
        rnd = request.round
        given = request.hyperparameters
        if not isinstance(given, Mapping):
            raise PolicyRefusal(f"round {rnd}: hyper-parameters must be a mapping of names")
        out: dict[str, float | int] = {}
        for key, value in given.items():
            rng = self.hyperparameters.get(key) if isinstance(key, str) else None
            if rng is None:
                raise PolicyRefusal(
                    f"round {rnd}: hyper-parameter {str(key)[:64]!r} is not allowed by this "
                    f"site; allowed: {', '.join(sorted(self.hyperparameters)) or 'none'}"
                )
            out[key] = _check_value(rnd, key, value, rng)
        for key, rng in self.hyperparameters.items():
            if key not in out:
                if rng.default is None:
                    raise PolicyRefusal(
                        f"round {rnd}: hyper-parameter {key!r} is missing and this site's "
                        "policy gives it no default"
                    )
                out[key] = rng.default
        return out

    def check_upload(self, nbytes: Any, rnd: int | None = None) -> None:
        """Refuse an upload (expected or actual) above ``max_upload_bytes``."""
        where = f"round {rnd}: " if rnd is not None else ""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise PolicyRefusal(f"{where}upload size {nbytes!r} must be a whole number of bytes")
        if nbytes > self.max_upload_bytes:
            raise PolicyRefusal(
                f"{where}an upload of {nbytes} bytes is over this site's cap "
                f"max_upload_bytes={self.max_upload_bytes}"
            )

    # -- the key holder ---------------------------------------------------------------------
    def check_sum(self, round_num: Any, num_clients: Any, num_sites: Any, own_clients: Any) -> None:
        """Refuse to help open a sum smaller than ``min_sum`` (clients or sites), or one
        holding fewer than ``min_sum.clients - max_colluding_clients`` of the site's own
        clients (``own_clients``: counted by the site from its own clients' signed
        contributions, never the coordinator's word) when it holds any.

        Across organisations one colluding site can supply any number of "clients" that
        add no noise, so the sum's totals say nothing about the noise in it; the site
        sizes each of its clients' noise shares for ``min_sum.clients -
        max_colluding_clients`` honest ones (its accountant's rule) and trusts only its
        own, so they alone must be that many. A sum with none of the site's clients
        releases nothing of the site's."""
        rnd = _check_round(round_num)
        for what, value, least in (
            ("clients", num_clients, self.min_sum.clients),
            ("sites", num_sites, self.min_sum.sites),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise PolicyRefusal(f"round {rnd}: a sum's number of {what} must be an integer")
            if value < least:
                raise PolicyRefusal(
                    f"round {rnd}: a sum of {value} {what} is below this site's "
                    f"min_sum.{what}={least}; its key holder does not help open it"
                )
        if isinstance(own_clients, bool) or not isinstance(own_clients, int):
            raise PolicyRefusal(
                f"round {rnd}: the number of the site's own clients must be an integer"
            )
        if not 0 <= own_clients <= num_clients:
            raise PolicyRefusal(
                f"round {rnd}: {own_clients} own clients in a sum of {num_clients} clients"
            )
        own_least = self.min_sum.clients - self.privacy.max_colluding_clients
        if 0 < own_clients < own_least:
            raise PolicyRefusal(
                f"round {rnd}: a sum holding {own_clients} of this site's own clients is below "
                f"min_sum.clients - privacy.max_colluding_clients = {own_least}: the others' "
                "noise is not this site's to trust; its key holder does not help open it"
            )
        with self._ledger_lock():
            self._reload()
            if rnd < self.last_completed_round:
                raise PolicyRefusal(
                    f"round {rnd}: this site already completed round {self.last_completed_round}"
                )
            if rnd not in self._rounds and len(self._rounds) >= self.max_rounds:
                raise PolicyRefusal(
                    f"round {rnd}: this site took part in {len(self._rounds)} rounds, its "
                    f"max_rounds={self.max_rounds}; it takes part in no more"
                )

    # -- the privacy budget -----------------------------------------------------------------
    @property
    def releases(self) -> int:
        """Releases the site signed so far (sums it approved)."""
        return len(self._releases)

    def epsilon_vs_server(self) -> float:
        """The site's epsilon against the server after the releases it signed."""
        return self._epsilon_after(self.releases)

    def record_release(
        self, round_num: int, update_ids: Iterable[str], key_fingerprint: str | bytes
    ) -> float:
        """Count the sum the site approves in ``round_num``, the sum of ``update_ids``
        under the threshold key ``key_fingerprint`` (call it before the approval leaves the
        site); returns the new ``epsilon_vs_server``.

        The release is identified by a digest computed here from exactly that approval
        statement (:func:`approval_digest`), never by a caller's label: the same statement
        again (a retried message) counts once; any other statement is another release. A
        round at or before the last one the site completed is refused (one sum per round;
        a coordinator cannot re-run a round the site already released), and so is a new
        round past ``max_rounds`` or past the budget; refused means not counted."""
        rnd = _check_round(round_num)
        digest = approval_digest(rnd, update_ids, key_fingerprint)
        with self._ledger_lock():
            self._reload()  # another process on this ledger may have counted meanwhile
            if (rnd, digest) in self._releases:
                return self.epsilon_vs_server()
            self._check_participation(rnd, "approve a sum of")
            self._check_budget(rnd)
            self._releases.append((rnd, digest))
            self._rounds.add(rnd)
            if self._dp is not None:
                self._dp.step([0])
            self._save_ledger()
        return self.epsilon_vs_server()

    def client_plan(self, codec: Any = None):
        """The site's DP plan (clip norm, noise share) from its own settings, for its
        clients; None without DP. Passing the codec lets the accountant count the
        quantization grid (see :class:`fedray.privacy.dp.ClientLevelDP`)."""
        if self._dp is None:
            return None
        plan = self._dp.client_plan(codec)
        for cache in ("_eps_cache", "_eps_server_cache"):  # a new grid changes C'
            getattr(self._dp, cache, {}).clear()
        return plan

    def _epsilon_after(self, releases: int) -> float:
        if self._dp is None:  # no DP: any release gives the server the update
            return math.inf if releases else 0.0
        if self.privacy.mode == "sample":
            return self._dp.client_epsilon(0, releases)
        return self._dp.client_epsilon_vs_server(releases)

    def _check_budget(self, rnd: int) -> None:
        budget = self.privacy.max_epsilon_vs_server
        if budget is None:
            return
        if self._dp.rounds_within_target_vs_server(1) == 0:
            raise PolicyRefusal(
                f"round {rnd}: this site's epsilon_vs_server would be "
                f"{self._epsilon_after(self.releases + 1):.4g} after one more release, over its "
                f"budget privacy.max_epsilon_vs_server={budget} ({self.releases} releases "
                "signed); it takes part in no more rounds"
            )

    # -- the ledger -------------------------------------------------------------------------
    def _ledger_settings(self) -> dict[str, Any]:
        p = self.privacy
        hp = self.hyperparameters
        sample = p.mode == "sample"
        return {
            "mode": p.mode,
            "noise_multiplier": p.noise_multiplier,
            "clip_norm": p.clip_norm,
            "delta": p.delta,
            "max_colluding_clients": p.max_colluding_clients,
            "min_sum_clients": self.min_sum.clients,
            "examples": p.examples,
            "batch_size": hp["batch_size"].max if sample else None,
            "local_epochs": hp["local_epochs"].max if sample else None,
        }

    @contextmanager
    def _ledger_lock(self):
        """An exclusive lock on the ledger (``<ledger>.lock``, flock) across processes."""
        path = self.privacy.ledger
        if not path:
            yield
            return
        try:
            fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PolicyError(
                f"privacy.ledger={path!r} cannot be locked ({exc.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _create_ledger(self) -> None:
        path = self.privacy.ledger
        marker = f"{path}.created"
        if os.path.exists(marker):
            raise PolicyError(
                f"privacy.ledger={path!r} is missing but {marker!r} says this site created it "
                "before: its releases are lost; restore the ledger (the site does not take "
                "part with an unknown count of releases)"
            )
        if not self.privacy.new_ledger:
            raise PolicyError(
                f"privacy.ledger={path!r} does not exist; if this site starts a new ledger, "
                "say so (privacy.new_ledger: true, or load_policy(..., new_ledger=True)); "
                "otherwise restore it"
            )
        _write_durably(marker, json.dumps({"site": self.site}).encode())
        self._save_ledger()

    def _reload(self) -> None:
        """Read the ledger again (under the lock): what another process on the same
        ledger counted is counted here too; a ledger that does not extend what this one
        saw is refused."""
        path = self.privacy.ledger
        if not path:
            return
        if not os.path.exists(path):
            raise PolicyError(
                f"privacy.ledger={path!r} has disappeared; the site does not take part with "
                "an unknown count of releases"
            )
        try:
            with open(path) as f:
                state = json.load(f)
            releases = [(int(r), str(s)) for r, s in state["releases"]]
            rounds = {int(r) for r in state["rounds"]}
            settings = state["settings"]
        except Exception as exc:
            raise PolicyError(
                f"privacy.ledger={path!r} cannot be read ({type(exc).__name__}); the site "
                "does not take part with an unknown count of releases"
            ) from None
        if settings != self._ledger_settings():
            raise PolicyError(
                f"privacy.ledger={path!r} was written under other DP settings {settings}; "
                "its releases cannot be re-counted under these"
            )
        known = len(self._releases)
        if releases[:known] != self._releases or not self._rounds <= rounds:
            raise PolicyError(
                f"privacy.ledger={path!r} no longer holds the releases this site counted; "
                "it was replaced or edited"
            )
        for rel in releases[known:]:
            self._releases.append(rel)
            if self._dp is not None:
                self._dp.step([0])
        self._rounds = rounds

    def _save_ledger(self) -> None:
        path = self.privacy.ledger
        if not path:
            return
        state = {
            "site": self.site,
            "settings": self._ledger_settings(),
            "releases": [list(r) for r in self._releases],
            "rounds": sorted(self._rounds),
        }
        _write_durably(path, json.dumps(state).encode())


def approval_digest(round_num: int, update_ids: Iterable[str], key_fingerprint) -> str:
    """The id of a release: SHA-256 (hex) of the approval statement (the key's
    fingerprint, the round and the sorted, distinct update ids)."""
    if isinstance(update_ids, str | bytes):
        raise PolicyRefusal(f"round {round_num}: update ids must be a list of ids")
    ids = list(update_ids)
    if not ids or not all(isinstance(u, str) and u for u in ids) or len(set(ids)) != len(ids):
        raise PolicyRefusal(f"round {round_num}: an approval names distinct, non-empty update ids")
    if isinstance(key_fingerprint, bytes | bytearray):
        key_fingerprint = bytes(key_fingerprint).hex()
    if not isinstance(key_fingerprint, str) or not key_fingerprint:
        raise PolicyRefusal(f"round {round_num}: an approval names the key it is for")
    statement = json.dumps(
        [APPROVAL_DOMAIN, key_fingerprint, int(round_num), sorted(ids)], separators=(",", ":")
    )
    return hashlib.sha256(statement.encode()).hexdigest()


def _write_durably(path: str, data: bytes) -> None:
    """Write ``path`` atomically: a unique temp file beside it, fsynced, renamed over it,
    then the directory fsynced so the rename itself survives a crash."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _check_round(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyRefusal(f"round number {value!r:.32} must be an integer")
    if value < 1:
        raise PolicyRefusal(f"round {value}: round numbers start at 1")
    if value > _MAX_ROUND:
        raise PolicyRefusal("a round number over 2**63-1")
    return value


def _check_value(rnd: int, key: str, value: Any, rng: Range) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyRefusal(f"round {rnd}: hyper-parameter {key}={value!r:.32} is not a number")
    if rng.integer and not isinstance(value, int):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise PolicyRefusal(f"round {rnd}: hyper-parameter {key}={value!r} must be an integer")
        value = int(value)  # 2.0 from a wire that carries doubles
    if not rng.min <= value <= rng.max:  # NaN compares False: refused too
        raise PolicyRefusal(
            f"round {rnd}: hyper-parameter {key}={value!r} is outside this site's range "
            f"[{rng.min}, {rng.max}]"
        )
    return value


def _build_accountant(policy: SitePolicy):
    """The site's own accountant, fedray's (one pseudo-client: the site; each release it
    signs counts for all its clients, whose updates are each in at most one sum)."""
    p = policy.privacy
    if p.mode == "none":
        return None
    from fedray.privacy.dp import ClientLevelDP, SampleLevelDP

    if p.mode == "sample":
        hp = policy.hyperparameters
        return SampleLevelDP(
            noise_multiplier=p.noise_multiplier,
            clip_norm=p.clip_norm,
            delta=p.delta,
            batch_size=int(hp["batch_size"].max),
            local_epochs=int(hp["local_epochs"].max),
            client_sizes={0: int(p.examples)},
            target_epsilon_vs_server=p.max_epsilon_vs_server,
            accountant=p.accountant,
        )
    return ClientLevelDP(
        clip_norm=p.clip_norm,
        noise_multiplier=p.noise_multiplier,
        delta=p.delta,
        rate=1.0,  # against the server no sampling amplifies: it picks the cohorts
        num_clients=1,
        min_clients=policy.min_sum.clients,
        distributed=True,  # across organisations sums are opened under encryption
        reproducible_noise=False,  # the site's noise is from the OS CSPRNG, always
        target_epsilon_vs_server=p.max_epsilon_vs_server,
        accountant=p.accountant,
        colluding_clients=p.max_colluding_clients,
    )


# -- loading --------------------------------------------------------------------------------

_TOP = (
    "site",
    "tasks",
    "max_rounds",
    "hyperparameters",
    "min_sum",
    "privacy",
    "max_upload_bytes",
    "answer_after_s",
)
_TOP_REQUIRED = ("tasks", "max_rounds", "hyperparameters", "min_sum", "privacy", "max_upload_bytes")
_TASK_KEYS = ("id", "version", "class", "model_fingerprint")
_RANGE_KEYS = ("min", "max", "default")
_MIN_SUM_KEYS = ("clients", "sites")
_PRIVACY_KEYS = (
    "mode",
    "noise_multiplier",
    "clip_norm",
    "delta",
    "max_epsilon_vs_server",
    "accountant",
    "max_colluding_clients",
    "examples",
    "ledger",
    "new_ledger",
)


def _fail(msg: str) -> PolicyError:
    return PolicyError(f"site policy: {msg}")


def _keys(prefix: str, obj: Any, allowed: Iterable[str], required: Iterable[str] = ()) -> dict:
    label = prefix or "the policy"
    if not isinstance(obj, Mapping):
        raise _fail(f"{label} must be a mapping with keys: {', '.join(allowed)}")
    allowed = tuple(allowed)
    for key in obj:
        if key not in allowed:
            name = f"{prefix}.{key}" if prefix else str(key)
            raise _fail(f"{name} is not a known key; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in obj:
            name = f"{prefix}.{key}" if prefix else key
            raise _fail(f"{name} is missing")
    return dict(obj)


def _int(key: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= 2**63 - 1:
        raise _fail(f"{key}={_short(value)} must be an integer >= {least} (and < 2**63)")
    return value


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value) and abs(value) <= 1e300  # a huge YAML int: one error
    except OverflowError:
        return False


def _num(key: str, value: Any, *, positive: bool = True, allow_zero: bool = False) -> float:
    ok = _finite(value)
    if ok and positive:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = " >= 0" if allow_zero else " > 0" if positive else ""
        raise _fail(f"{key}={_short(value)} must be a finite number{bound}")
    return value


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "<a huge integer>"
    return text[:80]


def _str(key: str, value: Any, pattern: re.Pattern, what: str) -> str:
    if not isinstance(value, str):
        hint = " (quote it: YAML reads 1.10 as the number 1.1)" if key.endswith("version") else ""
        raise _fail(f"{key}={_short(value)} must be a string: {what}{hint}")
    if not pattern.fullmatch(value):
        raise _fail(f"{key}={_short(value)} must be {what}")
    return value


def policy_from_dict(
    data: Any, base_dir: str | os.PathLike | None = None, new_ledger: bool = False
) -> SitePolicy:
    """Validate a parsed policy (see the module docstring); PolicyError names the key.
    ``base_dir``: the policy file's directory, against which a relative ledger path is
    read (without it a ledger path must be absolute). ``new_ledger``: the site starts a
    new privacy ledger (as ``privacy.new_ledger: true``)."""
    top = _keys("", data, _TOP, _TOP_REQUIRED)
    site = _str("site", top.get("site", "site"), _ID, "a site id ([A-Za-z0-9_-], at most 64)")

    tasks_raw = top["tasks"]
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise _fail("tasks must be a non-empty list of {id, version, class, model_fingerprint}")
    tasks: list[TaskEntry] = []
    for i, raw in enumerate(tasks_raw):
        k = f"tasks[{i}]"
        t = _keys(k, raw, _TASK_KEYS, _TASK_KEYS)
        tid = _str(f"{k}.id", t["id"], _ID, "a task id ([A-Za-z0-9_-], at most 64)")
        ver = _str(f"{k}.version", t["version"], _VERSION, "a version (digits and dots: 1.10)")
        cls = _str(f"{k}.class", t["class"], _DOTTED, "a dotted class path (package.module.Class)")
        fp = t["model_fingerprint"]
        if not isinstance(fp, str) or not _SHA256.fullmatch(fp):
            raise _fail(
                f"{k}.model_fingerprint={fp!r} must be 64 lowercase hex digits (SHA-256; "
                "fedray.federation.policy.model_fingerprint computes it)"
            )
        module = cls.rpartition(".")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise _fail(f"{k}.class={cls!r}: module {module!r} is not installed at this site")
        if any(e.id == tid and e.version == ver for e in tasks):
            raise _fail(f"{k}: task {tid}@{ver} is listed twice")
        tasks.append(TaskEntry(tid, ver, cls, fp))

    max_rounds = _int("max_rounds", top["max_rounds"], 1)

    hp_raw = top["hyperparameters"]
    if not isinstance(hp_raw, Mapping):
        raise _fail("hyperparameters must be a mapping of name -> {min, max[, default]}")
    hyper: dict[str, Range] = {}
    for name, raw in hp_raw.items():
        k = f"hyperparameters.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):
            raise _fail(f"{k} must be named [a-z][a-z0-9_]* (what the wire carries)")
        r = _keys(k, raw, _RANGE_KEYS, ("min", "max"))
        lo = _num(f"{k}.min", r["min"], positive=False)
        hi = _num(f"{k}.max", r["max"], positive=False)
        if lo > hi:
            raise _fail(f"{k}.min={lo!r} must be <= {k}.max={hi!r}")
        rng = Range(lo, hi)
        default = r.get("default")
        if default is not None:
            default = _num(f"{k}.default", default, positive=False)
            if not lo <= default <= hi or (rng.integer and not isinstance(default, int)):
                raise _fail(f"{k}.default={default!r} must be a value in [{lo}, {hi}]")
        hyper[name] = Range(lo, hi, default)

    ms = _keys("min_sum", top["min_sum"], _MIN_SUM_KEYS, _MIN_SUM_KEYS)
    min_sum = MinSum(
        clients=_int("min_sum.clients", ms["clients"], 2),  # a sum of one client is its update
        sites=_int("min_sum.sites", ms["sites"], 1),
    )

    pr = _keys("privacy", top["privacy"], _PRIVACY_KEYS, ("mode",))
    mode = pr["mode"]
    if mode not in PRIVACY_MODES:
        raise _fail(
            f"privacy.mode={mode!r} is not allowed; choose one of: {', '.join(PRIVACY_MODES)}"
        )
    if mode == "none":
        extra = sorted(set(pr) - {"mode"})
        if extra:
            raise _fail(f"privacy.{extra[0]} is set but privacy.mode=none (no DP, no budget)")
        privacy = PrivacyPolicy(mode="none")
    else:
        for key in ("noise_multiplier", "clip_norm", "delta", "max_epsilon_vs_server"):
            if key not in pr:
                raise _fail(f"privacy.{key} is missing (needed with privacy.mode={mode})")
        accountant = pr.get("accountant", "rdp")
        if accountant not in ACCOUNTANTS:
            raise _fail(
                f"privacy.accountant={accountant!r} is not allowed; choose one of: "
                + ", ".join(ACCOUNTANTS)
            )
        delta = _num("privacy.delta", pr["delta"])
        if not delta < 1:
            raise _fail(f"privacy.delta={delta!r} must be in (0, 1)")
        colluding = _int("privacy.max_colluding_clients", pr.get("max_colluding_clients", 0), 0)
        if colluding >= min_sum.clients:
            raise _fail(
                f"privacy.max_colluding_clients={colluding} must be < "
                f"min_sum.clients={min_sum.clients}"
            )
        ledger = pr.get("ledger")
        if ledger is not None:
            if not isinstance(ledger, str | os.PathLike) or not str(ledger):
                raise _fail(f"privacy.ledger={_short(ledger)} must be a file path")
            if not os.path.isabs(ledger):
                if base_dir is None:
                    raise _fail(
                        f"privacy.ledger={str(ledger)!r} must be an absolute path (in a "
                        "policy file a relative one is read from the file's directory)"
                    )
                ledger = os.path.join(os.path.abspath(base_dir), ledger)
        new = pr.get("new_ledger", False)
        if not isinstance(new, bool):
            raise _fail(f"privacy.new_ledger={_short(new)} must be true or false")
        if new and ledger is None:
            raise _fail("privacy.new_ledger is set but privacy.ledger is not")
        examples = pr.get("examples")
        if mode == "sample":
            if examples is None:
                raise _fail("privacy.examples is missing (needed with privacy.mode=sample)")
            examples = _int("privacy.examples", examples, 1)
            for key in ("batch_size", "local_epochs"):
                r = hyper.get(key)
                if r is None or r.min != r.max or not r.integer:
                    raise _fail(
                        f"hyperparameters.{key} must be pinned (integer min == max) with "
                        "privacy.mode=sample: the site's accountant counts its DP-SGD steps"
                    )
        elif examples is not None:
            raise _fail("privacy.examples is set but is used only with privacy.mode=sample")
        budget = pr["max_epsilon_vs_server"]
        if budget is not None:
            budget = _num("privacy.max_epsilon_vs_server", budget)
            if ledger is None:
                raise _fail(
                    "privacy.ledger is missing: with a budget (privacy.max_epsilon_vs_server) "
                    "the site counts its releases in a ledger that survives restarts"
                )
        privacy = PrivacyPolicy(
            mode=mode,
            noise_multiplier=_num(
                "privacy.noise_multiplier", pr["noise_multiplier"], allow_zero=True
            ),
            clip_norm=_num("privacy.clip_norm", pr["clip_norm"]),
            delta=delta,
            max_epsilon_vs_server=budget,
            accountant=accountant,
            max_colluding_clients=colluding,
            examples=examples,
            ledger=None if ledger is None else str(ledger),
            new_ledger=bool(new or new_ledger),
        )

    cap = _int("max_upload_bytes", top["max_upload_bytes"], 1)
    return SitePolicy(
        tasks=tuple(tasks),
        max_rounds=max_rounds,
        hyperparameters=hyper,
        min_sum=min_sum,
        privacy=privacy,
        max_upload_bytes=cap,
        site=site,
        answer_after_s=float(
            _num("answer_after_s", top.get("answer_after_s", 0.0), allow_zero=True)
        ),
    )


def load_policy(path: str | os.PathLike, new_ledger: bool = False) -> SitePolicy:
    """Read and validate a site's policy file (YAML). A relative ``privacy.ledger`` is
    read from the file's directory; ``new_ledger=True`` lets the site start a new ledger
    (the site agent's explicit flag; see the module docstring)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise PolicyError(f"site policy {str(p)!r} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"site policy {str(p)!r} is not valid YAML{where}") from None
    return policy_from_dict(data, base_dir=p.parent, new_ledger=new_ledger)
