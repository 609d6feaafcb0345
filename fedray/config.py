"""Typed configuration: Hydra structured-config schemas and the checks run before Ray starts.

The YAML files under ``conf/`` extend these dataclasses; Hydra rejects unknown keys and
wrong types, ``__post_init__`` rejects bad single values, and :func:`validate` rejects bad
combinations. Every error is a :class:`~fedray.errors.ConfigError` whose message names
the key and the allowed values, so the launcher can print it as one line.
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from fedray.errors import ConfigError

DATASETS = ("breast_cancer", "digits", "wine", "synthetic", "csv", "text", "text_synthetic")
TEXT_DATASETS = ("text", "text_synthetic")
MODELS = ("mlp", "logreg", "cnn", "custom", "hf")
PRECISIONS = ("fp32", "bf16")
STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "median",
    "trimmed_mean",
    "krum",
)
# Strategies that must see each client's update in the clear: refused with encryption.
PLAINTEXT_ONLY_STRATEGIES = ("median", "trimmed_mean", "krum")
PARTITIONS = ("iid", "dirichlet", "shards")
MISSING_VALUES = ("error", "drop_rows", "impute_mean")
STANDARDIZE = ("site", "global", "none")
# Data sets whose features fedray scales (digits has a fixed scale; synthetic is generated
# at unit scale; text is tokenised).
SCALED_DATASETS = ("breast_cancer", "wine", "csv")
EXTRA_COLUMNS = ("ignore", "error")
CRYPTO = ("paillier", "none")
OBFUSCATORS = ("fixed_base", "standard")
CUSTODIES = ("threshold", "shared")
PRIVACY = ("none", "dp")
NOISE_PLACEMENTS = ("auto", "distributed", "central")
PRIVACY_MODES = ("client", "sample")
CLUSTERS = ("local", "remote")
COMPRESSIONS = ("none", "int8", "topk")
CLUSTER_MODES = ("auto", "silo", "simulation")

# Paillier moduli below this are factorable with public effort; NIST SP 800-57 puts
# 2048-bit RSA-type moduli at 112-bit security, the floor for data protected past 2030.
MIN_SECURE_KEY_BITS = 2048


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be a finite number {bound}")


@dataclass
class DatasetConfig:
    """Where clients' data comes from and how bundled data is split among clients."""

    name: str = "breast_cancer"
    """The data set (the ``dataset`` group's option): ``breast_cancer``, ``digits``, ``wine``
    (scikit-learn's bundled sets, split among the clients), ``synthetic`` (FedProx
    Synthetic), ``csv`` (each site's own table), ``text`` (each site's JSON-lines file) or
    ``text_synthetic`` (generated topic documents); the last two need ``model=hf``."""
    partition: str = "iid"
    """How a bundled set is split among the clients: ``iid``, ``dirichlet`` (label skew,
    ``dataset.dirichlet_alpha``) or ``shards`` (``dataset.shards_per_client`` label-sorted
    shards each)."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet label (``partition=dirichlet``) or topic
    (``text_synthetic``) mix; smaller is more skewed."""
    shards_per_client: int = 2
    """``partition=shards``: label-sorted shards each client gets."""
    test_fraction: float = 0.2
    """Share of a bundled set kept out of the clients' data as the server's central test
    set, in [0, 1)."""
    holdout_fraction: float = 0.2
    """Share of each client's examples held out as its validation split (federated
    evaluation), in [0, 1)."""
    standardize: str = "site"
    """How features are scaled: ``site`` (each client with its own training rows' mean and
    deviation), ``global`` (z-scored with the federation-wide mean and deviation, opened
    once before round 1 by the same secure aggregation as the updates: the server learns
    the federation's per-feature sums, never a site's, but they give away the federation's
    row count and, with the weights, ``weight_ref``: docs/data.md; not with ``privacy=dp``
    or across organisations), or ``none``. ``digits``, ``synthetic`` and text are never
    scaled. ``true``/``false`` read as ``site``/``none``."""
    alpha: float = 0.5
    """FedProx Synthetic(alpha, beta): how much the clients' labelling models differ."""
    beta: float = 0.5
    """FedProx Synthetic(alpha, beta): how much the clients' feature distributions differ."""
    samples_per_client: int = 100
    """Examples generated per client (``synthetic``, ``text_synthetic``)."""
    num_features: int = 60
    """Feature width of ``synthetic``."""
    num_classes: int = 10
    """Classes of ``synthetic`` (topics of ``text_synthetic``); with ``csv`` across
    organisations (``federation=cross_org``), the label count every party declares alike
    (labels 0..num_classes-1), as no party reads another's tables."""
    test_samples_per_client: int = 10
    """``synthetic``: fresh test rows drawn per sampled client's distribution for the
    server's test set (at most 2,000 rows in all)."""
    path: str | None = None
    """``csv``, ``text``: each client's own file, a pattern with ``{client_id}`` (e.g.
    ``data/site_{client_id}.csv``), opened only inside that client's actor; ``.parquet``
    and ``.pq`` files are read as Parquet."""
    label: str | None = None
    """``csv``: the label column (integer class ids)."""
    test_path: str | None = None
    """``csv``, ``text``: an optional central test file for the server."""
    features: list[str] | None = None
    """``csv``: the feature columns, matched by name (docs/data.md); null: client 0's
    columns but the label, in its order. The feature matrix follows this order."""
    extra_columns: str = "ignore"
    """``csv``: columns a file has beyond the features and the label: ``ignore`` (logged)
    or ``error``."""
    missing: str = "error"
    """``csv``: a row with an empty cell is an ``error``, dropped (``drop_rows``), or its
    empty feature cells are filled with the federation-wide mean of the column
    (``impute_mean``: opened before round 1 by secure aggregation, like ``standardize=global``;
    not with ``privacy=dp``; a row without a label is still an error)."""
    categorical: Any = None
    """``csv``: column -> its allowed values, one-hot in this order, e.g. ``{sex: [F, M]}``;
    null: none. Typed Any, so that both ``dataset.categorical={sex:[F,M]}`` and
    ``+dataset.categorical.sex=[F,M]`` work on the command line (a typed dict takes only the
    second)."""
    max_length: int = 32
    """``text``, ``text_synthetic``: tokens per document (longer ones are cut)."""
    topic_strength: float = 0.3
    """``text_synthetic``: share of a document's words drawn from its topic, in (0, 1]."""
    test_samples: int = 1000
    """``text_synthetic``: documents in the server's test set."""
    share_label_counts: bool = False
    """Per-site metadata stays on the site unless the user opts in: with true, each site's
    example count and label histogram go to the driver (log, ``clients.json``)."""
    weight_ref: float | None = None
    """Public example count that maps to FedAvg weight 1.0; null: the largest site's count,
    computed by the hosts along a chain (the driver learns only that maximum)."""

    def __post_init__(self) -> None:
        _choice("dataset", self.name, DATASETS)
        # true/false (also as OmegaConf's "True"/"False" for a str field) read as auto/none
        mode = {"true": "site", "false": "none"}.get(str(self.standardize).lower())
        self.standardize = mode or str(self.standardize)
        _choice("dataset.standardize", self.standardize, STANDARDIZE)
        if self.weight_ref is not None:
            _positive("dataset.weight_ref", self.weight_ref)
        _choice("dataset.partition", self.partition, PARTITIONS)
        _positive("dataset.dirichlet_alpha", self.dirichlet_alpha)
        _positive("dataset.shards_per_client", self.shards_per_client)
        for key in ("test_fraction", "holdout_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"dataset.{key}={value!r} must be in [0, 1)")
        _positive("dataset.alpha", self.alpha, allow_zero=True)
        _positive("dataset.beta", self.beta, allow_zero=True)
        _positive("dataset.samples_per_client", self.samples_per_client)
        if self.name == "csv" and not self.label:
            raise ConfigError("dataset.label must name the label column for dataset=csv")
        self._check_table_options()
        if self.name == "text" and (not self.path or "{client_id}" not in self.path):
            raise ConfigError(
                "dataset.path must be set for dataset=text and contain '{client_id}', "
                "e.g. dataset.path='data/site_{client_id}.jsonl'"
            )
        _positive("dataset.max_length", self.max_length)
        _positive("dataset.test_samples", self.test_samples)
        if not 0.0 < self.topic_strength <= 1.0:
            raise ConfigError(f"dataset.topic_strength={self.topic_strength!r} must be in (0, 1]")

    def check_table_path(self) -> None:
        """dataset=csv: the party that reads the tables needs ``dataset.path`` with
        ``{client_id}`` in it. Across organisations that is each site; the coordinator
        reads no table (:func:`validate`)."""
        if self.name == "csv" and (not self.path or "{client_id}" not in self.path):
            raise ConfigError(
                "dataset.path must be set for dataset=csv and contain '{client_id}', "
                "e.g. dataset.path=data/site_{client_id}.csv"
            )

    def _check_table_options(self) -> None:
        """dataset.features / extra_columns / missing / categorical (dataset=csv)."""
        _choice("dataset.extra_columns", self.extra_columns, EXTRA_COLUMNS)
        _choice("dataset.missing", self.missing, MISSING_VALUES)
        if self.name != "csv" and (self.features is not None or self.categorical):
            which = "dataset.features" if self.features is not None else "dataset.categorical"
            raise ConfigError(f"{which} applies to dataset=csv only (dataset={self.name})")
        if self.features is not None:
            names = [str(f) for f in self.features]
            if not names or any(not n.strip() for n in names):
                raise ConfigError(
                    "dataset.features must be null (client 0's columns) or a list of column "
                    "names, e.g. dataset.features=[age,bmi,sex]"
                )
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ConfigError(f"dataset.features names {', '.join(twice)} more than once")
            if self.label in names:
                raise ConfigError(
                    f"dataset.features must not include the label column {self.label!r}"
                )
        if self.categorical is None:
            return
        if not isinstance(self.categorical, dict):
            raise ConfigError(
                f"dataset.categorical={self.categorical!r} must map each categorical column to "
                "its allowed values, e.g. dataset.categorical={sex: [F, M]}"
            )
        declared: dict[str, list[str]] = {}
        for col, values in self.categorical.items():
            example = f"e.g. dataset.categorical={{{col}: [F, M]}}"
            if not isinstance(values, list | tuple) or not values:
                raise ConfigError(
                    f"dataset.categorical.{col} must be a non-empty list of allowed values, "
                    + example
                )
            vocab = [str(v) for v in values]
            declared[str(col)] = vocab
            twice = sorted({v for v in vocab if vocab.count(v) > 1})
            if twice:
                raise ConfigError(
                    f"dataset.categorical.{col} lists {', '.join(twice)} more than once"
                )
            if col == self.label:
                raise ConfigError(
                    f"dataset.categorical.{col}: the label column cannot be categorical "
                    "(labels are integer class ids 0..K-1)"
                )
            if self.features is not None and col not in self.features:
                raise ConfigError(
                    f"dataset.categorical.{col}: {col!r} is not in dataset.features "
                    f"({', '.join(self.features)})"
                )
        self.categorical = declared  # values as text: a CSV cell is text


@dataclass
class LoraSettings:
    """LoRA adapters through peft (Hu et al., ICLR 2022); ``r: 0`` = full fine-tuning."""

    r: int = 8
    """LoRA rank; 0: no adapters, every parameter is fine-tuned and exchanged."""
    alpha: float = 16.0
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA layers' input, in [0, 1)."""
    target_modules: list[str] | None = None
    """Modules that get adapters; null: peft's default for the architecture (query and value
    for BERT)."""

    def __post_init__(self) -> None:
        _positive("model.lora.r", self.r, allow_zero=True)
        _positive("model.lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout={self.dropout!r} must be in [0, 1)")


@dataclass
class ModelConfig:
    """The model every client trains. ``_target_`` selects any torch ``nn.Module`` class."""

    name: str = "mlp"
    """The model (the ``model`` group's option): ``mlp`` (one hidden layer), ``logreg``,
    ``cnn`` (the 8x8 image CNN, ``dataset=digits`` only), ``custom`` (``model._target_``) or
    ``hf`` (a local Hugging Face checkpoint, ``model.path``)."""
    hidden: int = 128
    """``mlp``: width of the hidden layer."""
    _target_: str | None = None
    """``custom``: the ``torch.nn.Module`` class to build, ``package.module.Class``; it gets
    ``num_features``, ``num_classes`` and ``model.kwargs``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """``custom``: extra keyword arguments for the model class (an open mapping:
    ``+model.kwargs.width=64``)."""
    trainable: list[str] | None = None
    """Names (or prefixes) of the parameters that are trained and exchanged; null: those
    with requires_grad (all, or adapters and head under LoRA)."""
    path: str | None = None
    """``hf``: a local AutoModelForSequenceClassification directory (config, weights,
    tokenizer); nothing is downloaded."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """``hf``: the LoRA adapters (see ``model.lora``)."""
    precision: str = "fp32"
    """``hf``: ``fp32``, or ``bf16`` (autocast on the actor's device)."""

    def __post_init__(self) -> None:
        _choice("model", self.name, MODELS)
        _choice("model.precision", self.precision, PRECISIONS)
        _positive("model.hidden", self.hidden)
        if self.name == "custom" and not self._target_:
            raise ConfigError("model=custom needs model._target_=package.module.Class")
        if self.name == "hf" and not self.path:
            raise ConfigError(
                "model=hf needs model.path=DIR, a local Hugging Face checkpoint "
                "(make one with: python -m fedray.tools.tiny_model DIR)"
            )


@dataclass
class TaskConfig:
    """``_target_``: a :class:`fedray.tasks.Task` subclass (null: the built-in task for
    ``model``); ``kwargs`` go to its constructor."""

    _target_: str | None = None
    """Your task class, ``package.module.Class`` (a subclass of ``fedray.tasks.Task``);
    null: the built-in task for ``model`` (tabular classification, or text for ``hf``)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the task's constructor (an open mapping:
    ``+task.kwargs.NAME=VALUE``)."""


@dataclass
class StrategyConfig:
    """Server aggregation and optimizer; see :mod:`fedray.strategies` for the papers."""

    name: str = "fedavg"
    """The server's aggregation (the ``strategy`` group's option). ``median``,
    ``trimmed_mean`` and ``krum`` need each update in the clear: refused with
    ``crypto=paillier``."""
    server_lr: float = 1.0
    """Server learning rate: the step taken along the aggregated update."""
    server_momentum: float = 0.9
    """``fedavgm``: server momentum beta (m <- beta m + delta), in [0, 1)."""
    beta1: float = 0.9
    """``fedadam``, ``fedyogi``, ``fedadagrad``: first-moment decay, in [0, 1)."""
    beta2: float = 0.99
    """``fedadam``, ``fedyogi``: second-moment decay, in [0, 1)."""
    tau: float = 1e-3
    """``fedadam``, ``fedyogi``, ``fedadagrad``: adaptivity (the step's denominator is
    sqrt(v) + tau)."""
    proximal_mu: float = 0.0
    """FedProx: clients add (mu/2)||w - w_global||^2 to their loss (``strategy=fedprox``
    uses 0.01 when this is 0)."""
    trim_fraction: float = 0.1
    """``trimmed_mean``: share of the largest and of the smallest values dropped per
    coordinate, in [0, 0.5)."""
    krum_byzantine: int = 1
    """``krum``: f, the Byzantine clients tolerated (a round needs more than f + 2
    updates)."""
    krum_select: int = 1
    """``krum``: updates averaged, those with the lowest Krum scores (1: Krum, more:
    Multi-Krum)."""

    def __post_init__(self) -> None:
        _choice("strategy", self.name, STRATEGIES)
        _positive("strategy.server_lr", self.server_lr)
        _positive("strategy.proximal_mu", self.proximal_mu, allow_zero=True)
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"strategy.trim_fraction={self.trim_fraction!r} must be in [0, 0.5)")
        for key in ("server_momentum", "beta1", "beta2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"strategy.{key}={value!r} must be in [0, 1)")
        _positive("strategy.tau", self.tau)
        _positive("strategy.krum_byzantine", self.krum_byzantine, allow_zero=True)
        _positive("strategy.krum_select", self.krum_select)


@dataclass
class CryptoConfig:
    """Packed Paillier secure aggregation (``paillier``) or plaintext updates (``none``)."""

    name: str = "paillier"
    """``paillier``: the server sees only ciphertexts and the opened sum; ``none``:
    plaintext updates."""
    key_bits: int = 2048
    """Paillier modulus size in bits, a multiple of 8; below 2048 is refused unless
    ``crypto.allow_insecure_keys=true``."""
    allow_insecure_keys: bool = False
    """Allow keys below 2048 bits (tests only: such moduli are factorable)."""
    quant_bits: int = 16
    """BatchCrypt quantization width r: each clipped value becomes an r-bit signed integer
    slot, in [2, 32]."""
    clip: float = 1.0
    """Each weighted update value is clipped to +-clip before quantizing (counted as
    ``values_clipped``)."""
    obfuscator: str = "fixed_base"
    """Shared custody's CRT obfuscators: ``fixed_base`` (fast) or ``standard``."""
    host_sum: bool = True
    """A host with many simulated clients encrypts their sum once (the server still sees
    no single client); false: one update per client."""
    fast_decrypt: bool = True
    """Threshold custody: hosts give each key holder a share of their obfuscator exponents,
    so opening a sum is one fixed-base power per ciphertext, not t partial decryptions
    (which remain the fallback)."""
    dealer_site: str | None = None
    """A custom resource (e.g. ``site_a``): run the one-shot key dealer on the node that
    offers it; null: where Ray puts it."""
    processes: int | None = None
    """Processes per host for one update's encryption (and the server's for opening a
    sum); null: as many as ``client.num_cpus`` (the server: its machine's CPUs) once an
    update has 1,000 ciphertexts or more."""
    custody: str = "threshold"
    """``threshold``: no process holds the private key after set-up; t of the key holders
    (one per client actor, at its site) decrypt a sum. ``shared``: every host holds the
    whole key (weaker: one client colluding with the server reads every update)."""
    threshold: int | None = None
    """t, the key holders needed to open a sum (more than half of them, at least 2);
    null: a majority of the key holders."""

    def __post_init__(self) -> None:
        _choice("crypto", self.name, CRYPTO)
        _choice("crypto.obfuscator", self.obfuscator, OBFUSCATORS)
        _choice("crypto.custody", self.custody, CUSTODIES)
        if self.threshold is not None and self.threshold < 2:
            raise ConfigError(
                f"crypto.threshold={self.threshold} must be >= 2 (one key holder alone must "
                "not decrypt), or null for a majority of the key holders"
            )
        if self.key_bits < 256 or self.key_bits % 8:
            raise ConfigError(
                f"crypto.key_bits={self.key_bits} must be a multiple of 8 and >= 256 "
                f"(>= {MIN_SECURE_KEY_BITS} for real use)"
            )
        if (
            self.name == "paillier"
            and self.key_bits < MIN_SECURE_KEY_BITS
            and not self.allow_insecure_keys
        ):
            raise ConfigError(
                f"crypto.key_bits={self.key_bits} is below the secure minimum "
                f"{MIN_SECURE_KEY_BITS}; use >= {MIN_SECURE_KEY_BITS} or set "
                "crypto.allow_insecure_keys=true (tests only)"
            )
        if not 2 <= self.quant_bits <= 32:
            raise ConfigError(f"crypto.quant_bits={self.quant_bits} must be in [2, 32]")
        _positive("crypto.clip", self.clip)
        if self.processes is not None and self.processes < 1:
            raise ConfigError(
                f"crypto.processes={self.processes} must be >= 1, or null (automatic)"
            )


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg) and its accountant."""

    name: str = "none"
    """``dp``: differential privacy on (the ``privacy`` group's option); ``none``: off."""
    noise_multiplier: float = 1.0
    """sigma: the Gaussian noise's standard deviation in units of the clip norm C."""
    clip_norm: float = 1.0
    """C: the L2 norm each client's update (``mode=client``) or each example's gradient
    (``mode=sample``) is clipped to."""
    delta: float = 1e-5
    """The delta at which epsilon is reported, in (0, 1)."""
    noise: str = "auto"
    """Where the noise is added: ``distributed`` (each client adds a share before
    encrypting; needs ``crypto=paillier``), ``central`` (the server adds it; needs
    ``crypto=none``) or ``auto`` (distributed with encryption, central without)."""
    target_epsilon: float | None = None
    """Stop before the round that would take epsilon past this (sigma is not
    recalibrated); null: no target."""
    target_epsilon_vs_server: float | None = None
    """Stop before any client's epsilon against the server (no sampling amplification)
    could pass this; the key holders enforce it. Needs DP against the server: refused
    with central or seeded noise."""
    reproducible_noise: bool = False
    """Seeded noise (numpy / torch generators from the job seed): runs replay exactly, and
    anyone who knows the seed, the server included, can subtract the noise. Research
    only; summary.json records it. Default: noise from the OS CSPRNG."""
    secure_rng: bool | None = None
    """Deprecated alias, kept for old configs: secure_rng=false means
    reproducible_noise=true, secure_rng=true the default. null: not given."""
    mode: str = "client"
    """``client``: client-level DP-FedAvg (protects a whole site); ``sample``: DP-SGD inside
    each client with Opacus (protects each example)."""
    accountant: str = "rdp"
    """The ``dp-accounting`` accountant: ``rdp`` (Renyi DP) or ``pld`` (privacy loss
    distributions)."""
    max_colluding_clients: int = 0
    """k, the clients of a round that may collude with the server (each knows, and can
    subtract, its own noise share): distributed shares are sized so that the other
    min_clients_per_round - k clients' shares alone carry sigma C. 0 <= k < m_min."""

    @property
    def seeded_noise(self) -> bool:
        """True when noise comes from seeded generators (research mode)."""
        return self.reproducible_noise or self.secure_rng is False

    def __post_init__(self) -> None:
        _choice("privacy", self.name, PRIVACY)
        _choice("privacy.noise", self.noise, NOISE_PLACEMENTS)
        _choice("privacy.mode", self.mode, PRIVACY_MODES)
        _choice("privacy.accountant", self.accountant, ("rdp", "pld"))
        _positive("privacy.noise_multiplier", self.noise_multiplier, allow_zero=True)
        _positive("privacy.clip_norm", self.clip_norm)
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta={self.delta!r} must be in (0, 1)")
        if self.target_epsilon is not None:
            _positive("privacy.target_epsilon", self.target_epsilon)
        if self.target_epsilon_vs_server is not None:
            _positive("privacy.target_epsilon_vs_server", self.target_epsilon_vs_server)
        if self.secure_rng is True and self.reproducible_noise:
            raise ConfigError(
                "privacy.secure_rng=true contradicts privacy.reproducible_noise=true; "
                "drop privacy.secure_rng (deprecated: OS noise is the default)"
            )
        if self.secure_rng is not None:
            import warnings

            warnings.warn(
                "privacy.secure_rng is deprecated: OS CSPRNG noise is the default; use "
                "privacy.reproducible_noise=true for seeded noise",
                FutureWarning,  # shown to users by default, unlike DeprecationWarning
                stacklevel=2,
            )


@dataclass
class CompressionConfig:
    """Compression of plaintext updates (:mod:`fedray.compression`)."""

    name: str = "none"
    """``int8`` (one byte per value plus a scale), ``topk`` (the largest values as
    (index, value) pairs) or ``none``; plaintext updates only (``crypto=none``, no DP)."""
    topk_fraction: float = 0.01
    """``topk``: the share of values (largest magnitude) that travel, in (0, 1]."""

    def __post_init__(self) -> None:
        _choice("compression", self.name, COMPRESSIONS)
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ConfigError(f"compression.topk_fraction={self.topk_fraction!r} must be in (0, 1]")


@dataclass
class ClusterConfig:
    """How clients map onto Ray actors and nodes."""

    name: str = "local"
    """``local``: an embedded Ray started by the launcher; ``remote``: join a running
    cluster (sets ``ray.address=auto``)."""
    mode: str = "auto"
    """``silo``: one actor per client; ``simulation``: a pool of actors, each hosting many
    virtual clients; ``auto``: silo when the clients fit on the CPUs (or
    ``cluster.sites`` is set), else simulation."""
    num_actors: int | None = None
    """Simulation mode: the size of the actor pool; null: as many as fit (at most
    ``num_clients``)."""
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per-client placement by custom resource, e.g. ``{"0": {"site_a": 1}, "1":
    {"site_b": 1}}`` (silo mode; ``+cluster.sites.0.site_a=1`` on the command line)."""
    verify_models: str = "auto"
    """Hosts check each global model against the opened sums before they train (see
    fedray/runtime/lineage.py): ``auto`` (on wherever the job is verifiable), ``true``
    (refuse a job that is not), ``false``."""

    def __post_init__(self) -> None:
        _choice("cluster", self.name, CLUSTERS)
        _choice("cluster.mode", self.mode, CLUSTER_MODES)
        self.verify_models = str(self.verify_models).lower()
        _choice("cluster.verify_models", self.verify_models, ("auto", "true", "false"))
        if self.num_actors is not None:
            _positive("cluster.num_actors", self.num_actors)


@dataclass
class RayConfig:
    """``address: null`` starts an embedded local Ray; ``auto`` or HOST:PORT joins one."""

    address: str | None = None
    """null: start an embedded local Ray; ``auto`` or HOST:PORT: join a running cluster."""
    num_cpus: int | None = None
    """Embedded Ray: the CPUs it offers; null: the machine's."""
    num_gpus: int | None = None
    """Embedded Ray: the GPUs it offers; null: Ray detects them."""
    object_store_memory: int | None = None
    """Embedded Ray: its object store's size in bytes; null: Ray's default."""
    include_dashboard: bool = False
    """Embedded Ray: start Ray's dashboard."""


@dataclass
class ClientResources:
    """Resources each client actor asks Ray for (fractions allowed)."""

    num_cpus: float = 1.0
    """CPUs each client actor asks for (fractions allowed)."""
    num_gpus: float = 0.0
    """GPUs each client actor asks for (e.g. 0.5: half a GPU); with one, it trains on
    CUDA."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each client actor asks for, e.g. ``{site_a: 1}`` (an open
    mapping)."""

    def __post_init__(self) -> None:
        _positive("client.num_cpus", self.num_cpus, allow_zero=True)
        _positive("client.num_gpus", self.num_gpus, allow_zero=True)
        for name, amount in self.resources.items():
            _positive(f"client.resources.{name}", amount)


@dataclass
class CheckpointConfig:
    """``every: N`` writes a checkpoint every N rounds (0: only after the last round)."""

    every: int = 5
    """Write a checkpoint every N rounds (and after the last); 0: only after the last.
    Across organisations the coordinator writes one every round, whatever this says (a
    resume must start where the sites are)."""
    path: str | None = None
    """The checkpoints folder; null: ``checkpoints/`` in the run directory. With
    ``resume=true`` it may name an old run's checkpoints folder, its ``latest`` or one
    ``round_NNNNN`` folder."""

    def __post_init__(self) -> None:
        _positive("checkpoint.every", self.every, allow_zero=True)


FEDERATIONS = ("none", "cross_org")


@dataclass
class FederationConfig:
    """``federation=cross_org``: the coordinator's side (``python -m fedray.launch``) and a
    site agent's (``python -m fedray.site``) of a federation of separate Ray clusters.

    ``certs``: the folder of ``python -m fedray.tools.certs`` (``ca.pem``,
    ``federation.json`` and ``<party>/cert.pem, key.pem, signing.key``); ``keys``: the
    folder of ``python -m fedray.tools.keys deal`` (``federation_key.json`` and, at a
    site, ``<site>.share``). ``party``: this party's id in the manifest (default: the
    coordinator's, in the launcher). See docs/federation.md."""

    name: str = "none"
    """``none``: one Ray cluster; ``cross_org``: separate Ray clusters per organisation,
    joined by the federation channel (docs/federation.md)."""
    party: str | None = None
    """This party's id in the manifest (null in the launcher: the coordinator's)."""
    certs: str | None = None
    """The folder of ``python -m fedray.tools.certs`` (``ca.pem``, ``federation.json``,
    ``<party>/``)."""
    keys: str | None = None
    """The folder of ``python -m fedray.tools.keys deal`` (``federation_key.json`` and, at
    a site, ``<site>.share``)."""
    listen: str = "127.0.0.1:7443"
    """The coordinator's federation endpoint, HOST:PORT (mutual-TLS gRPC)."""
    connect: str | None = None
    """A site: the coordinator's HOST:PORT it dials."""
    policy: str | None = None
    """A site: its policy file (docs/site-policy.md)."""
    state: str | None = None
    """A site: the file where it records, durably, the last round it took part in under
    each key, whatever the job (it never trains, opens or attests a round at or before it
    again, across restarts, runs and jobs: a new job needs a new key); null:
    ``<federation.keys>/<party>.rounds.json``."""
    connect_timeout_s: float = 300.0
    """How long each side waits for the other, in seconds."""
    reconnect_max_s: float = 30.0
    """A site: the longest wait between two attempts to reach the coordinator, in
    seconds, at least 0.1 (the wait starts at 0.5 s, or this if lower, and doubles with
    +-20% jitter up to this); a coordinator that comes back is dialled again at most this
    long after (plus the dial's own time)."""
    answer_after_s: float = 0.0
    """A site (in one cluster: each client host, per call) sends its update no sooner
    than this many seconds after the train request came (0: as soon as it is sealed), so
    when it answers does not tell how long its clients trained (a client whose training
    fails early, say); a padding site or host sends no train or encrypt seconds. Set it
    above the longest round and below ``round_timeout_s``; a round that takes longer
    still shows. A site policy's ``answer_after_s`` does the same (the longer
    applies)."""
    max_colluding_sites: int | None = None
    """Sites assumed to collude with the coordinator: a site signs and opens only sums of
    at least max_colluding_sites + 2 sites, so every opened sum holds two honest ones.
    null (the default): t - 1 for the federation key's threshold t, the most colluding
    key holders the key itself withstands (t sites together open anything)."""
    task_id: str = "fedray"
    """The task id the coordinator names; a site's policy checks it."""
    task_version: str = "1"
    """The task version the coordinator names; a site's policy checks it."""

    def __post_init__(self) -> None:
        _choice("federation", self.name, FEDERATIONS)
        _positive("federation.connect_timeout_s", self.connect_timeout_s)
        if not (math.isfinite(self.reconnect_max_s) and self.reconnect_max_s >= 0.1):
            raise ConfigError(
                f"federation.reconnect_max_s={self.reconnect_max_s!r} must be a finite number "
                ">= 0.1 (seconds between a site's dials; 30 by default)"
            )
        _positive("federation.answer_after_s", self.answer_after_s, allow_zero=True)
        k = self.max_colluding_sites
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            raise ConfigError(
                f"federation.max_colluding_sites={k!r} must be an integer >= 0, or null "
                "(t - 1 for the key's threshold t)"
            )


@dataclass
class FedrayConfig:
    """The whole job. Field names are the public override contract (see DESIGN.md)."""

    dataset: DatasetConfig = MISSING
    """Where the clients' data comes from (a config group: ``dataset=NAME``)."""
    model: ModelConfig = MISSING
    """The model every client trains (a config group: ``model=NAME``)."""
    strategy: StrategyConfig = MISSING
    """The server's aggregation and optimizer (a config group: ``strategy=NAME``)."""
    crypto: CryptoConfig = MISSING
    """Secure aggregation (a config group: ``crypto=paillier|none``)."""
    privacy: PrivacyConfig = MISSING
    """Differential privacy (a config group: ``privacy=dp|none``)."""
    cluster: ClusterConfig = MISSING
    """Placement of clients on Ray (a config group: ``cluster=local|remote``)."""
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Compression of plaintext updates (a config group: ``compression=NAME``)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Which Ray to run on, and the embedded one's size."""
    client: ClientResources = field(default_factory=ClientResources)
    """What each client actor asks Ray for."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """How often and where checkpoints are written."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task (data loading, model, training step) clients run."""
    federation: FederationConfig = field(default_factory=FederationConfig)
    """Across organisations (a config group: ``federation=none|cross_org``)."""

    num_clients: int = 10
    """Clients in the federation (ids 0 .. num_clients - 1)."""
    clients_per_round: int | None = None
    """Clients sampled each round (the expected number under client-level DP's Poisson
    sampling); null: every client, each round (num_clients)."""
    min_clients_per_round: int | None = None
    """Fewest finished clients a round accepts, else it is retried; null: half the cohort,
    at least 1 (at least 2 with encryption)."""
    rounds: int = 20
    """Rounds to run (a resume may raise it to extend a finished run)."""
    local_epochs: int = 1
    """Epochs each sampled client trains on its data per round."""
    batch_size: int = 32
    """Local training batch size."""
    lr: float = 0.1
    """Local (client) learning rate."""
    momentum: float = 0.0
    """Local SGD momentum of the tabular task, in [0, 1)."""
    seed: int = 0
    """Fixes the partition, the initial model, the cohorts and every client's batches (not
    the DP noise, which comes from the OS unless ``privacy.reproducible_noise``)."""
    target_accuracy: float | None = None
    """Stop once the central test accuracy reaches this, in (0, 1]; null: run every
    round."""
    round_timeout_s: float | None = None
    """Per-round deadline in seconds; late updates are dropped and counted
    (``clients_late``); null: wait for every client."""
    max_round_retries: int = 3
    """Retries of a round that got fewer than ``min_clients_per_round`` updates before the
    run stops."""
    federated_eval: bool = True
    """Clients evaluate the global model on their validation split (``fed_val_loss``,
    ``fed_val_accuracy``; not sent under DP)."""
    resume: bool = False
    """Continue a run from its checkpoint (``hydra.run.dir=OLD resume=true``, or
    ``checkpoint.path``), with the run's own saved config."""
    progress: bool = True
    """Print the set-up line and one progress line per round."""

    def __post_init__(self) -> None:
        if self.clients_per_round is None:
            self.clients_per_round = self.num_clients
        for key in ("num_clients", "clients_per_round", "rounds", "local_epochs", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r} must be an integer >= 1")
        _positive("lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum={self.momentum!r} must be in [0, 1)")
        if self.target_accuracy is not None and not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError(f"target_accuracy={self.target_accuracy!r} must be in (0, 1]")
        if self.round_timeout_s is not None:
            _positive("round_timeout_s", self.round_timeout_s)
            pad = self.federation.answer_after_s
            if pad >= self.round_timeout_s:
                raise ConfigError(
                    f"federation.answer_after_s={pad:g} must be below "
                    f"round_timeout_s={self.round_timeout_s:g}: every padded answer would "
                    "come after the round's deadline"
                )
        _positive("max_round_retries", self.max_round_retries, allow_zero=True)


# Overrides that may differ from a run's saved config when it is resumed: they change how
# long it runs, where and how it reports, not what its checkpoint means.
RESUME_SAFE_KEYS = frozenset(
    {
        "rounds",
        "progress",
        "target_accuracy",
        "round_timeout_s",
        "max_round_retries",
        "checkpoint.every",
        "privacy.target_epsilon",
        "privacy.target_epsilon_vs_server",
        "ray",  # and every ray.* key (shown as ray.*)
    }
)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _is_open(tp: Any) -> bool:
    """A dict or Any field: any key below it is the user's (model.kwargs.*, cluster.sites.*)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is dict:
        return True
    return any(_is_open(a) for a in typing.get_args(tp) if a is not type(None))


def _dataclass_of(tp: Any) -> type | None:
    if is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if is_dataclass(arg):
            return arg
    return None


def check_override_key(key: str) -> str | None:
    """Why a command-line key is not in the schema (with the nearest key), or None if it is.

    Catches typos that Hydra would let through with ``+`` (``+round=5``).
    """
    cls: type | None = FedrayConfig
    done: list[str] = []
    for part in key.split("."):
        if cls is None:
            return f"{'.'.join(done)} has no sub-key {part!r}"
        types = _field_types(cls)
        if part not in types:
            prefix = ".".join(done) + "." if done else ""
            near = difflib.get_close_matches(part, list(types), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{near[0]}?" if near else ""
            return f"unknown key {prefix + part!r}{hint}"
        done.append(part)
        if _is_open(types[part]):
            return None
        cls = _dataclass_of(types[part])
    return None


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called before ``@hydra.main``)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="fedray_schema", node=FedrayConfig)


def to_config(cfg: DictConfig | FedrayConfig) -> FedrayConfig:
    """Turn a composed Hydra config into a checked :class:`FedrayConfig`.

    Raises ConfigError with one line naming the key, whatever layer found the problem.
    """
    if isinstance(cfg, FedrayConfig):
        validate(cfg)
        return cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(FedrayConfig), cfg)
        obj = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as exc:  # OmegaConf's ValidationError etc.: keep only the first line
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(first) from exc
    validate(obj)
    return obj


def min_clients(cfg: FedrayConfig) -> int:
    """Fewest finished clients a round accepts (default: half the cohort, at least 1;
    at least 2 with encryption, so a decrypted sum is never one client's update)."""
    if cfg.min_clients_per_round is not None:
        return cfg.min_clients_per_round
    floor = 2 if cfg.crypto.name == "paillier" else 1
    return max(floor, math.ceil(cfg.clients_per_round / 2))


def _check_dp_holds_against_the_server(privacy: PrivacyConfig, crypto: str) -> None:
    """privacy.target_epsilon_vs_server bounds a figure that must exist: no DP holds
    against a server that sees each update (client level without encryption) or can
    replay the noise (reproducible noise); epsilon_vs_server is null there."""
    why = None
    if privacy.seeded_noise:
        why = "with privacy.reproducible_noise=true the server can replay the noise"
    elif crypto == "none" and privacy.mode == "client":
        why = "with crypto=none the server sees each client's update before adding noise"
    elif crypto == "none":
        why = (
            "with crypto=none it sees each DP-SGD update in the clear and only it counts "
            "them; with crypto=paillier the key holders open one sum per round"
        )
    if why:
        raise ConfigError(
            f"privacy.target_epsilon_vs_server={privacy.target_epsilon_vs_server}: no DP holds "
            f"against the server ({why}); use crypto=paillier and the default OS noise, or "
            "privacy.target_epsilon"
        )


def _check_colluding_clients(cfg: FedrayConfig) -> None:
    """privacy.max_colluding_clients = k: the honest m_min - k clients of a round must
    exist, so 0 <= k < min_clients_per_round (k = m_min would ask for infinite shares)."""
    k, m = cfg.privacy.max_colluding_clients, min_clients(cfg)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < m:
        raise ConfigError(
            f"privacy.max_colluding_clients={k!r} must be an integer from 0 to "
            f"min_clients_per_round - 1 = {m - 1} (min_clients_per_round={m})"
        )


def _validate_task(cfg: FedrayConfig) -> None:
    """Which data the built-in tasks can read (a custom task reads what it likes)."""
    if cfg.task._target_:
        return
    text = cfg.dataset.name in TEXT_DATASETS
    if cfg.model.name == "hf" and not text:
        raise ConfigError(
            f"model=hf classifies text; dataset={cfg.dataset.name} is not text: use "
            "dataset=text or text_synthetic (or a task._target_ of your own)"
        )
    if text and cfg.model.name != "hf":
        raise ConfigError(
            f"dataset={cfg.dataset.name} needs model=hf model.path=DIR (or a task._target_ "
            "of your own)"
        )
    if cfg.model.name == "hf" and cfg.privacy.name == "dp" and cfg.privacy.mode == "sample":
        raise ConfigError(
            "privacy.mode=sample (Opacus DP-SGD) is not supported with model=hf; use "
            "privacy.mode=client"
        )


def standardization(cfg: FedrayConfig) -> str:
    """How the job's features are scaled: ``global``, ``site`` or ``none``
    (``dataset.standardize`` resolved: see its doc)."""
    ds = cfg.dataset
    built_in = not cfg.task._target_ and cfg.model.name != "hf"
    if ds.standardize == "none" or ds.name not in SCALED_DATASETS or not built_in:
        return "none"
    return ds.standardize


def needs_feature_statistics(cfg: FedrayConfig) -> bool:
    """Whether the job opens the federation's per-feature sums before round 1 (global
    standardisation, or means to impute missing cells with)."""
    imputes = cfg.dataset.name == "csv" and cfg.dataset.missing == "impute_mean"
    return standardization(cfg) == "global" or imputes


def _validate_scaling(cfg: FedrayConfig) -> None:
    """dataset.standardize=global and dataset.missing=impute_mean open federation-wide
    feature sums: refused where that cannot be done, or not honestly."""
    ds = cfg.dataset
    asked = []
    if ds.standardize == "global":
        asked.append(("dataset.standardize=global", "dataset.standardize=site"))
    if ds.name == "csv" and ds.missing == "impute_mean":
        asked.append(("dataset.missing=impute_mean", "dataset.missing=drop_rows"))
    for what, instead in asked:
        why = None
        if ds.name not in SCALED_DATASETS:
            why = (
                f"it applies to dataset={'|'.join(SCALED_DATASETS)} (digits has a fixed "
                "scale, synthetic data is generated at unit scale, text is tokenised)"
            )
            instead = "dataset.standardize=site|none"
        elif cfg.task._target_ or cfg.model.name == "hf":
            why = "it prepares the built-in task's tables; a task._target_ prepares its own"
        elif cfg.privacy.name == "dp":
            why = (
                "with privacy=dp the federation's feature sums would be opened without "
                "noise, outside the (epsilon, delta) accounting"
            )
        elif cfg.federation.name == "cross_org":
            why = "across organisations the sites' pre-round sum of feature statistics is not built yet"
        if why:
            raise ConfigError(f"{what} is not available here: {why}; use {instead}")


def validate(cfg: FedrayConfig) -> None:
    """Cross-field rules. Raises ConfigError naming the keys and the allowed values."""
    if cfg.federation.name != "cross_org":  # across organisations: the sites' (site.py)
        cfg.dataset.check_table_path()
    if cfg.clients_per_round > cfg.num_clients:
        raise ConfigError(
            f"clients_per_round={cfg.clients_per_round} must be between 1 and "
            f"num_clients={cfg.num_clients}"
        )
    if cfg.min_clients_per_round is not None and not (
        1 <= cfg.min_clients_per_round <= cfg.clients_per_round
    ):
        raise ConfigError(
            f"min_clients_per_round={cfg.min_clients_per_round} must be between 1 and "
            f"clients_per_round={cfg.clients_per_round}"
        )
    if cfg.crypto.name == "paillier" and min_clients(cfg) < 2:
        raise ConfigError(
            f"min_clients_per_round={cfg.min_clients_per_round} must be >= 2 with "
            "crypto=paillier (key holders never decrypt one client's update)"
        )
    if cfg.crypto.name == "paillier" and cfg.clients_per_round < 2:
        raise ConfigError(
            f"clients_per_round={cfg.clients_per_round} must be >= 2 with crypto=paillier "
            "(a sum of one client is that client's update)"
        )
    if cfg.crypto.name == "paillier" and cfg.strategy.name in PLAINTEXT_ONLY_STRATEGIES:
        raise ConfigError(
            f"strategy={cfg.strategy.name} needs each client's update in the clear and cannot "
            "run with crypto=paillier; use crypto=none, or one of: "
            + ", ".join(s for s in STRATEGIES if s not in PLAINTEXT_ONLY_STRATEGIES)
        )
    if cfg.privacy.name == "dp":
        if cfg.privacy.noise == "distributed" and cfg.crypto.name == "none":
            raise ConfigError(
                "privacy.noise=distributed needs crypto=paillier (without encryption the "
                "server would see each client's under-noised update); use privacy.noise=central"
            )
        if cfg.privacy.noise == "central" and cfg.crypto.name == "paillier":
            raise ConfigError(
                "privacy.noise=central cannot be used with crypto=paillier (the server only sees "
                "the decrypted sum); use privacy.noise=distributed or auto"
            )
        if cfg.privacy.target_epsilon_vs_server is not None:
            _check_dp_holds_against_the_server(cfg.privacy, cfg.crypto.name)
        _check_colluding_clients(cfg)
        if cfg.privacy.mode == "client" and cfg.strategy.name in PLAINTEXT_ONLY_STRATEGIES:
            raise ConfigError(
                f"privacy=dp is accounted for mean aggregation; strategy={cfg.strategy.name} "
                "is not supported with it"
            )
    _validate_task(cfg)
    _validate_scaling(cfg)
    if cfg.compression.name != "none" and cfg.crypto.name != "none":
        raise ConfigError(
            f"compression={cfg.compression.name} applies to plaintext updates; use crypto=none "
            "(encrypted updates are packed quantized values already: crypto.quant_bits)"
        )
    if cfg.compression.name != "none" and cfg.privacy.name == "dp":
        raise ConfigError(
            f"compression={cfg.compression.name} cannot be used with privacy=dp (it would "
            "change the clipped update the accountant relies on); use compression=none"
        )
    if cfg.cluster.verify_models == "true":
        from fedray.runtime.lineage import why_not_verifiable

        why = why_not_verifiable(cfg)
        if why:
            raise ConfigError(
                f"cluster.verify_models=true cannot check this job's models: {why}; or set "
                "cluster.verify_models=auto|false"
            )
    if cfg.model.name == "cnn" and cfg.dataset.name != "digits":
        raise ConfigError("model=cnn is the 8x8 image CNN and needs dataset=digits")
    if cfg.ray.address not in (None, "auto", "local") and ":" not in str(cfg.ray.address):
        raise ConfigError(
            f"ray.address={cfg.ray.address!r} must be null (embedded local Ray), auto, or HOST:PORT"
        )
    if cfg.cluster.name == "remote" and cfg.ray.address is None:
        raise ConfigError("cluster=remote needs ray.address=auto or HOST:PORT")
    for client_id in cfg.cluster.sites:
        if not str(client_id).isdigit() or int(client_id) >= cfg.num_clients:
            raise ConfigError(
                f"cluster.sites key {client_id!r} must be a client id in 0..{cfg.num_clients - 1}"
            )
    if cfg.crypto.name == "paillier":
        slot_bits = cfg.crypto.quant_bits + math.ceil(math.log2(cfg.clients_per_round + 1))
        if slot_bits > cfg.crypto.key_bits - 2:
            raise ConfigError(
                f"crypto.key_bits={cfg.crypto.key_bits} is too small to hold one "
                f"{slot_bits}-bit slot; lower crypto.quant_bits or raise crypto.key_bits"
            )
