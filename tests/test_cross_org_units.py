"""Unit tests of the cross-organisation pieces that need no Ray and no network: the strict
parser of a relayed contribution, the client ids every party derives from the manifest,
the certs tool's ``--clients``, the v3 message schema, the coordinator's site handle, the
configuration checks of a site and of the coordinator, and the fast path's exponent shares
sealed to the receiving site (who can open one, and what its key holder refuses).

Every refusal is matched on its own reason, so a test goes red when the line that guards
it is broken (not merely when some later check happens to refuse the same input).
"""

from __future__ import annotations

import json
import pickle
import re

import pytest

from fedray.errors import ConfigError
from fedray.federation import federation_pb2 as pb
from fedray.federation import messages as m
from fedray.federation.coordinator import (
    HANDLE_METHODS,
    SiteHandle,
    check_coordinator_config,
)
from fedray.federation.site import (
    CONTRIBUTION_FIELDS,
    check_site_config,
    contribution_from_statement,
    federation_clients,
)
from fedray.runtime.keys import Contribution, HostIdentity, SignedContribution, digest, verify
from fedray.tools import certs
from tests.conftest import compose, free_port

# --- contribution_from_statement -------------------------------------------------------


def _contribution(**kw) -> Contribution:
    fields = dict(
        key_id="k" * 16,
        round=3,
        update_id="u3-a",
        host=1,
        client_ids=(2, 3),
        ciphertext_sha256="c" * 64,
        share_sha256=(),
        model_sha256="m" * 64,
    )
    fields.update(kw)
    return Contribution(**fields)


@pytest.fixture(scope="module")
def signed() -> tuple[HostIdentity, Contribution, bytes, bytes]:
    identity = HostIdentity()
    c = _contribution()
    s = identity.sign(c)
    return identity, c, c.message(), s.signature


def _fields(statement: bytes) -> dict:
    return json.loads(statement)


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def test_a_signed_canonical_statement_round_trips(signed):
    identity, c, statement, signature = signed
    out = contribution_from_statement(statement, signature)
    assert out == SignedContribution(c, signature)
    assert isinstance(out.contribution.client_ids, tuple)
    assert out.contribution.message() == statement
    assert verify(identity.public_bytes(), out.signature, out.contribution.message())
    # and with share digests too (a tuple of strings after parsing)
    with_shares = _contribution(share_sha256=("a" * 64, "b" * 64))
    sig = identity.sign(with_shares).signature
    assert contribution_from_statement(with_shares.message(), sig).contribution == with_shares


def test_the_parser_knows_exactly_the_fields_of_a_contribution():
    assert set(CONTRIBUTION_FIELDS) == set(Contribution.__dataclass_fields__)


@pytest.mark.parametrize(
    "statement, reason",
    [
        (b"not json at all", "not a JSON statement"),
        (b"\xff\xfe{}", "not a JSON statement"),
        (pickle.dumps({"round": 1}), "not a JSON statement"),
        (b"[1, 2, 3]", "other fields"),
        (b'"a string"', "other fields"),
    ],
    ids=["text", "not-utf8", "pickle", "json-list", "json-string"],
)
def test_a_statement_that_is_not_one_json_object_is_refused(signed, statement, reason):
    with pytest.raises(PermissionError, match=reason):
        contribution_from_statement(statement, signed[3])


def test_a_json_list_of_exactly_the_field_names_is_refused(signed):
    statement = json.dumps(sorted(CONTRIBUTION_FIELDS)).encode()
    with pytest.raises(PermissionError, match="other fields"):
        contribution_from_statement(statement, signed[3])


def test_a_statement_with_an_extra_field_is_refused(signed):
    fields = _fields(signed[2]) | {"class": "os.system"}
    with pytest.raises(PermissionError, match="other fields"):
        contribution_from_statement(_canonical(fields), signed[3])


@pytest.mark.parametrize("missing", sorted(CONTRIBUTION_FIELDS))
def test_a_statement_with_a_missing_field_is_refused(signed, missing):
    fields = _fields(signed[2])
    del fields[missing]
    with pytest.raises(PermissionError, match="other fields"):
        contribution_from_statement(_canonical(fields), signed[3])


@pytest.mark.parametrize(
    "name, value, reason",
    [
        ("host", True, "host is not a int"),
        ("round", True, "round is not a int"),
        ("round", "3", "round is not a int"),
        ("round", 3.0, "round is not a int"),
        ("update_id", 7, "update_id is not a str"),
        ("client_ids", "2,3", "client_ids is not a list"),
        ("client_ids", [2.0, 3], "client ids are not integers"),
        ("client_ids", [True, 3], "client ids are not integers"),
        ("client_ids", ["2", 3], "client ids are not integers"),
        ("share_sha256", [1], "share digests are not strings"),
        ("ciphertext_sha256", None, "ciphertext_sha256 is not a str"),
    ],
    ids=[
        "bool-host",
        "bool-round",
        "str-round",
        "float-round",
        "int-update-id",
        "str-client-ids",
        "float-client-id",
        "bool-client-id",
        "str-client-id",
        "int-share-digest",
        "null-digest",
    ],
)
def test_a_statement_with_a_field_of_the_wrong_type_is_refused(signed, name, value, reason):
    fields = _fields(signed[2]) | {name: value}
    with pytest.raises(PermissionError, match=reason):
        contribution_from_statement(_canonical(fields), signed[3])


@pytest.mark.parametrize(
    "encode",
    [
        lambda f: json.dumps(f, sort_keys=True).encode(),  # spaces after , and :
        lambda f: json.dumps(dict(reversed(list(f.items()))), separators=(",", ":")).encode(),
        lambda f: _canonical(f) + b"\n",
        lambda f: b" " + _canonical(f),
        # the same key twice: json.loads keeps the last, the host never signed this
        lambda f: _canonical(f).replace(b'{"ciphertext_sha256"', b'{"round":9,"ciphertext_sha256"'),
    ],
    ids=["spaces", "reordered-keys", "trailing-newline", "leading-space", "duplicate-key"],
)
def test_non_canonical_bytes_of_the_same_content_are_refused(signed, encode):
    statement = encode(_fields(signed[2]))
    assert statement != signed[2]
    assert json.loads(statement) == _fields(signed[2])
    with pytest.raises(PermissionError, match="not in canonical form"):
        contribution_from_statement(statement, signed[3])


# --- federation_clients ----------------------------------------------------------------


def _manifest(tmp_path, sites: dict) -> str:
    path = tmp_path / "federation.json"
    path.write_text(json.dumps({"format": "fedray-federation-manifest", "sites": sites}))
    return str(path)


def test_client_ids_are_contiguous_in_manifest_order(tmp_path):
    # the file's order, not the alphabet: site z comes first here
    path = _manifest(tmp_path, {"z": {"clients": 2}, "a": {"clients": 3}, "m": {"clients": 1}})
    assert federation_clients(path) == {"z": [0, 1], "a": [2, 3, 4], "m": [5]}


def test_client_ids_of_a_manifest_the_certs_tool_wrote(tmp_path):
    certs.make_federation(tmp_path / "c", "hub", ["a", "b", "c"], clients={"a": 2, "b": 2, "c": 3})
    got = federation_clients(tmp_path / "c" / "federation.json")
    assert got == {"a": [0, 1], "b": [2, 3], "c": [4, 5, 6]}


@pytest.mark.parametrize(
    "entry", [{}, {"clients": 0}, {"clients": True}, {"clients": "2"}, {"clients": 2.0}]
)
def test_a_site_without_a_client_count_is_one_config_error_naming_the_option(tmp_path, entry):
    path = _manifest(tmp_path, {"a": {"clients": 2}, "b": entry})
    with pytest.raises(ConfigError) as err:
        federation_clients(path)
    text = str(err.value)
    assert "\n" not in text
    assert "site b" in text and "--clients" in text and path in text


# --- certs --clients -------------------------------------------------------------------


def _certs(tmp_path, clients: str, sites="a,b,c") -> int:
    argv = [str(tmp_path / "c"), "--coordinator", "hub", "--sites", sites]
    return certs.main([*argv, "--clients", clients])


def test_certs_writes_each_sites_client_count_to_the_manifest(tmp_path, capsys):
    assert _certs(tmp_path, "a=2, b=3,c=1") == 0
    manifest = json.loads((tmp_path / "c" / "federation.json").read_text())
    assert {s: e["clients"] for s, e in manifest["sites"].items()} == {"a": 2, "b": 3, "c": 1}
    assert "clients" not in manifest["coordinator"]
    # a site left out of --clients has no count (and federation_clients then refuses it)
    assert certs.main([str(tmp_path / "d"), "--coordinator", "hub", "--sites", "a,b"]) == 0
    manifest = json.loads((tmp_path / "d" / "federation.json").read_text())
    assert all("clients" not in e for e in manifest["sites"].values())


@pytest.mark.parametrize(
    "clients, reason",
    [
        ("a=2,z=1", "--clients names z, not among --sites"),
        ("a=0", "site a needs a whole number of clients >= 1"),
        ("a=two", "expected SITE=N"),
        ("a=1.5", "expected SITE=N"),
        ("a=-1", "expected SITE=N"),
        ("a", "expected SITE=N"),
    ],
    ids=["unknown-site", "zero", "word", "float", "negative", "no-count"],
)
def test_certs_refuses_a_bad_client_count_in_one_line(tmp_path, capsys, clients, reason):
    assert _certs(tmp_path, clients) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and reason in err
    assert not (tmp_path / "c" / "ca.key").exists()  # refused before anything is written


def test_make_federation_refuses_bad_counts_as_cert_errors(tmp_path):
    for clients in ({"a": 0}, {"a": True}, {"a": 2.0}, {"x": 1}):
        with pytest.raises(certs.CertError):
            certs.make_federation(tmp_path / "c", "hub", ["a"], clients=clients)
    assert not (tmp_path / "c" / "ca.key").exists()


# --- the v3 message schema -------------------------------------------------------------

SIG = b"s" * 64
DIGEST = b"d" * 32


def _ref(blob_id="b1") -> pb.BlobRef:
    return pb.BlobRef(blob_id=blob_id, size=64, sha256=DIGEST)


def _envelope(protocol=m.PROTOCOL_VERSION, **body) -> pb.Envelope:
    return pb.Envelope(protocol=protocol, sender="hub", recipient="a", seq=1, **body)


def _train_request(**kw) -> pb.Envelope:
    fields = dict(
        round=1,
        task_id="fedray",
        task_version="1",
        model_fingerprint=b"m" * 32,
        global_weights=_ref("w1"),
        client_ids=[0, 1],
    )
    fields.update(kw)
    return _envelope(request_id=1, train_request=pb.TrainRequest(**fields))


def _train_reply(**kw) -> pb.Envelope:
    fields = dict(
        round=1,
        update_id="u1",
        contribution=_contribution().message(),
        contribution_signature=SIG,
        ciphertexts=_ref(),
        train_seconds=1.5,
        encrypt_seconds=0.5,
    )
    fields.update(kw)
    return _envelope(in_reply_to=1, train_reply=pb.TrainReply(**fields))


def _share_sum_request(n_contributions=2, n_ciphertexts=2, statement=None) -> pb.Envelope:
    ids = ["u1", "u2"]
    statements = [
        pb.SignedStatement(
            statement=statement or _contribution(update_id=u).message(), signature=SIG
        )
        for u in ids
    ]
    return _envelope(
        request_id=3,
        share_sum_request=pb.ShareSumRequest(
            round=1,
            update_ids=ids,
            approvals=[pb.Approval(round=1, update_ids=ids, signature=SIG, host=h) for h in (0, 1)],
            contributions=statements[:n_contributions],
            ciphertexts=[_ref(f"c{k}") for k in range(n_ciphertexts)],
        ),
    )


def _sealed_share(update_id="u1", holder=2, **kw) -> pb.SealedShare:
    fields = dict(
        update_id=update_id,
        holder=holder,
        ephemeral_public=b"e" * 65,
        nonce=b"n" * 12,
        sealed=_ref(f"s{update_id}{holder}"),
    )
    fields.update(kw)
    return pb.SealedShare(**fields)


def _share_sum_fast(sealed=None, ciphertexts=0) -> pb.Envelope:
    env = _share_sum_request(2, ciphertexts)
    body = env.share_sum_request
    body.opening = pb.OPENING_SHARE_SUM
    body.sealed_shares.extend(sealed if sealed is not None else [_sealed_share("u2", 1)])
    return env


def test_valid_messages_of_this_protocol_pass_the_schema():
    assert m.PROTOCOL_VERSION == 5
    job = b'{"num_clients":4}'
    hello = pb.Hello(site_id="a", protocol_version=m.PROTOCOL_VERSION, nonce=b"n" * 32, job=job)
    assert m.check_envelope(_envelope(hello=hello)) == "hello"
    welcome = pb.Welcome(
        coordinator_id="hub", protocol_version=m.PROTOCOL_VERSION, nonce=b"n" * 32, job=job
    )
    assert m.check_envelope(_envelope(welcome=welcome)) == "welcome"
    assert m.check_envelope(_train_request()) == "train_request"
    pem = {"a": b"-----BEGIN CERTIFICATE-----", "b": b"x"}
    assert m.check_envelope(_train_request(site_certificates=pem)) == "train_request"
    shares = [_sealed_share("u1", 2), _sealed_share("u1", 3)]
    assert m.check_envelope(_train_reply(sealed_shares=shares)) == "train_reply"
    assert m.check_envelope(_share_sum_fast()) == "share_sum_request"
    assert m.check_envelope(_share_sum_fast(sealed=[])) == "share_sum_request"
    for answer in ("partial_decryption", "exponent_share_sum"):
        reply = pb.ShareSumReply(round=1, holder_id="a", **{answer: _ref("x")})
        assert m.check_envelope(_envelope(in_reply_to=3, share_sum_reply=reply)) == (
            "share_sum_reply"
        )
    assert m.check_envelope(_train_request(client_ids=[0])) == "train_request"
    failures = [pb.ClientFailure(client_id=3, reason="out of memory on cuda:0")]
    assert m.check_envelope(_train_reply(failures=failures)) == "train_reply"
    assert m.check_envelope(_train_reply(train_seconds=0.0)) == "train_reply"
    assert m.check_envelope(_share_sum_request()) == "share_sum_request"
    approval = pb.Approval(round=1, update_ids=["u1"], signature=SIG, host=2)
    assert m.check_envelope(_envelope(in_reply_to=2, approval=approval)) == "approval"
    both = _train_request(releases=[_release(1), _release(2)], release_plaintexts=_ref("m"))
    assert m.check_envelope(both) == "train_request"
    assert m.check_envelope(_share_sum_attest()) == "share_sum_request"
    reply = pb.ShareSumReply(round=1, holder_id="a", attestation=SIG)
    assert m.check_envelope(_envelope(in_reply_to=3, share_sum_reply=reply)) == "share_sum_reply"


def _release(round_num=1, **kw) -> pb.Release:
    fields = dict(
        round=round_num,
        model_sha256="ab" * 32,
        count=3,
        attestations=[pb.Attestation(holder=h, signature=SIG) for h in (1, 2)],
    )
    fields.update(kw)
    return pb.Release(**fields)


def _share_sum_attest(plaintexts=True, exponents=True) -> pb.Envelope:
    env = _share_sum_request()
    body = env.share_sum_request
    body.opening = pb.OPENING_ATTEST
    if plaintexts:
        body.plaintexts.CopyFrom(_ref("m1"))
    if exponents:
        body.exponents.CopyFrom(_ref("x1"))
    return env


@pytest.mark.parametrize(
    "release, reason",
    [
        (_release(0), "release of round 0"),
        (_release(1, model_sha256="AB" * 32), "not 64 hex digits"),
        (_release(1, model_sha256="ab" * 31), "not 64 hex digits"),
        (_release(1, attestations=[pb.Attestation(holder=0, signature=SIG)]), "holder 0"),
        (
            _release(1, attestations=[pb.Attestation(holder=2, signature=SIG)] * 2),
            "holder 2 (holders from 1, once each)",
        ),
        (_release(1, attestations=[pb.Attestation(holder=1, signature=SIG[:63])]), "signature"),
    ],
    ids=["round-0", "upper-hex", "short-digest", "holder-0", "holder-twice", "short-signature"],
)
def test_a_train_request_with_a_malformed_release_is_refused(release, reason):
    with pytest.raises(m.ProtocolError, match=re.escape(reason)):
        m.check_envelope(_train_request(releases=[release], release_plaintexts=_ref("m")))


def test_a_train_request_with_two_releases_of_one_round_is_refused():
    with pytest.raises(m.ProtocolError, match="release of round 1"):
        m.check_envelope(
            _train_request(releases=[_release(1), _release(1)], release_plaintexts=_ref("m"))
        )


def test_release_plaintexts_come_with_releases_and_only_with_them():
    for env in (
        _train_request(releases=[_release(1)]),
        _train_request(release_plaintexts=_ref("m")),
    ):
        with pytest.raises(m.ProtocolError, match="release plaintexts go with releases"):
            m.check_envelope(env)


def test_an_attest_request_carries_both_plaintexts_and_exponents_and_only_it_does():
    for env in (_share_sum_attest(plaintexts=False), _share_sum_attest(exponents=False)):
        with pytest.raises(m.ProtocolError, match="go with an attestation only"):
            m.check_envelope(env)
    fast = _share_sum_fast()
    fast.share_sum_request.plaintexts.CopyFrom(_ref("m1"))
    partial = _share_sum_request()
    partial.share_sum_request.exponents.CopyFrom(_ref("x1"))
    for env in (fast, partial):
        with pytest.raises(m.ProtocolError, match="go with an attestation only"):
            m.check_envelope(env)
    short = pb.ShareSumReply(round=1, holder_id="a", attestation=SIG[:32])
    with pytest.raises(m.ProtocolError, match="attestation"):
        m.check_envelope(_envelope(in_reply_to=3, share_sum_reply=short))


@pytest.mark.parametrize(
    "job, reason",
    [
        (b"\x80\x04K\x01.", "not a JSON object of settings"),  # a pickle
        (b"[1, 2]", "not a JSON object of settings"),
        (b'{"a": "' + b"x" * m.MAX_JOB_BYTES + b'"}', "is over"),
    ],
    ids=["pickle", "list", "oversized"],
)
def test_a_hello_or_welcome_whose_job_is_not_a_small_json_object_is_refused(job, reason):
    hello = pb.Hello(site_id="a", protocol_version=m.PROTOCOL_VERSION, nonce=b"n" * 32, job=job)
    with pytest.raises(m.ProtocolError, match=reason):
        m.check_envelope(_envelope(hello=hello))
    welcome = pb.Welcome(
        coordinator_id="hub", protocol_version=m.PROTOCOL_VERSION, nonce=b"n" * 32, job=job
    )
    with pytest.raises(m.ProtocolError, match=reason):
        m.check_envelope(_envelope(welcome=welcome))


def test_job_mismatch_names_each_setting_with_both_values():
    ours = {"a": 1, "b": [1, 2], "c": "x", "d": 0, "e": 0}
    assert m.job_mismatch(json.dumps(ours).encode(), json.dumps(ours).encode(), "p", "q") is None
    spaced = json.dumps(ours, indent=2).encode()  # the same settings, another encoding
    assert "different encodings" in m.job_mismatch(json.dumps(ours).encode(), spaced, "p", "q")
    theirs = {**ours, "b": [2, 1]}
    del theirs["c"]
    line = m.job_mismatch(json.dumps(ours).encode(), json.dumps(theirs).encode(), "p", "q")
    assert 'b: [1,2] at p, [2,1] at q; c: "x" at p, (not set) at q;' in line
    more = {**theirs, "d": 1, "e": 1}
    assert "and 1 more" in m.job_mismatch(
        json.dumps(ours).encode(), json.dumps(more).encode(), "p", "q"
    )
    assert "q declares no job" in m.job_mismatch(json.dumps(ours).encode(), b"", "p", "q")


def test_the_declared_job_holds_the_model_the_data_and_the_codec_but_not_a_partys_own():
    """Features in another order, another model or codec, another client total or seed:
    another job. Where a party's tables or model copy are and how it treats extra columns
    and empty cells: its own."""
    from fedray.federation.site import agreed_job

    base = [*SITE, "dataset=csv", "dataset.label=y", "dataset.num_classes=2"]
    job = agreed_job(compose([*base, "dataset.features=[a,b,c]"]))
    for other in (
        ["dataset.features=[b,a,c]"],
        ["dataset.features=[a,b,c]", "dataset.num_classes=3"],
        ["dataset.features=[a,b,c]", "dataset.label=z"],
        ["dataset.features=[a,b,c]", "dataset.standardize=false"],
        ["dataset.features=[a,b,c]", "dataset.categorical={c: [u, v]}"],
        ["dataset.features=[a,b,c]", "model.hidden=64"],
        ["dataset.features=[a,b,c]", "crypto.quant_bits=12"],
        ["dataset.features=[a,b,c]", "crypto.clip=2.0"],
        ["dataset.features=[a,b,c]", "seed=7"],
        ["dataset.features=[a,b,c]", "lr=0.05"],  # how each client trains
        ["dataset.features=[a,b,c]", "local_epochs=5"],
        ["dataset.features=[a,b,c]", "batch_size=16"],
        ["dataset.features=[a,b,c]", "momentum=0.5"],
        ["dataset.features=[a,b,c]", "dataset.weight_ref=99"],
        ["dataset.features=[a,b,c]", "clients_per_round=4"],  # the codec's summand count
        ["dataset.features=[a,b,c]", "privacy=dp"],  # the codec's clip (the DP plan's)
        ["dataset.features=[a,b,c]", "+model.kwargs={a: {b: 1}}"],
        ["dataset.features=[a,b,c]", "+task.kwargs={x: 1}"],
        # model checks: whether sites check models, and the step every site recomputes
        ["dataset.features=[a,b,c]", "cluster.verify_models=false"],
        ["dataset.features=[a,b,c]", "strategy=fedadam"],
        ["dataset.features=[a,b,c]", "strategy.server_lr=0.5"],
    ):
        key = other[-1].split("=")[0].lstrip("+")
        key = {
            "clients_per_round": "codec.max_summands",
            "privacy": "codec.clip",
            "cluster.verify_models": "model_checks",
            "strategy": "strategy.name",
        }.get(key, key)
        line = m.job_mismatch(job, agreed_job(compose([*base, *other])), "hub", "site a")
        assert line is not None and line.startswith("hub and site a declare different jobs: ")
        assert f" {key}: " in line, (other, line)
    for own in (
        ["dataset.path='/elsewhere/{client_id}.csv'"],
        ["dataset.extra_columns=error"],
        ["dataset.missing=drop_rows"],
        ["dataset.test_path=/t.csv"],
        ["model.precision=bf16"],
    ):
        assert agreed_job(compose([*base, "dataset.features=[a,b,c]", *own])) == job, own
    # Without model checks no site recomputes the step: the strategy is the coordinator's
    unchecked = [*base, "dataset.features=[a,b,c]", "cluster.verify_models=false"]
    assert json.loads(job)["model_checks"] is True
    assert agreed_job(compose(unchecked)) == agreed_job(compose([*unchecked, "strategy=fedadam"]))


def test_a_v1_envelope_is_refused():
    env = _train_request()
    env.protocol = 1
    with pytest.raises(m.ProtocolError, match="protocol version 1"):
        m.check_envelope(env)


@pytest.mark.parametrize(
    "client_ids, reason",
    [
        ([], "names no client"),
        ([2, 1], "not sorted, distinct"),
        ([1, 1], "not sorted, distinct"),
        ([-1, 2], "not sorted, distinct and >= 0"),
        (list(range(m.MAX_LIST_ITEMS + 1)), "more than"),
    ],
    ids=["none", "unsorted", "duplicate", "negative", "too-many"],
)
def test_a_train_request_with_bad_client_ids_is_refused(client_ids, reason):
    with pytest.raises(m.ProtocolError, match=reason):
        m.check_body(_train_request(client_ids=client_ids))


@pytest.mark.parametrize(
    "reason_text",
    ["two\nlines", "tab\there", "bell\x07", "x" * (m.MAX_REASON_CHARS + 1)],
    ids=["newline", "tab", "control", "too-long"],
)
def test_a_train_reply_failure_reason_must_be_one_printable_line(reason_text):
    env = _train_reply(failures=[pb.ClientFailure(client_id=1, reason=reason_text)])
    with pytest.raises(m.ProtocolError, match="failure reason is not one printable line"):
        m.check_body(env)


def test_a_train_reply_failure_of_a_negative_client_is_refused():
    env = _train_reply(failures=[pb.ClientFailure(client_id=-1, reason="x")])
    with pytest.raises(m.ProtocolError, match="client id -1 is negative"):
        m.check_body(env)


@pytest.mark.parametrize("what", ["train_seconds", "encrypt_seconds"])
@pytest.mark.parametrize(
    "value", [-0.5, float("nan"), float("inf"), float("-inf")], ids=["neg", "nan", "inf", "-inf"]
)
def test_a_train_reply_with_a_bad_timing_is_refused(what, value):
    with pytest.raises(m.ProtocolError, match=f"{what} .* is not a finite number >= 0"):
        m.check_body(_train_reply(**{what: value}))


@pytest.mark.parametrize("n_contributions, n_ciphertexts", [(1, 2), (2, 1), (3, 2), (2, 3), (0, 0)])
def test_a_share_sum_request_needs_one_contribution_and_blob_per_update(
    n_contributions, n_ciphertexts
):
    env = _share_sum_request(n_contributions, n_ciphertexts)
    if n_contributions > 2:
        env.share_sum_request.contributions.append(env.share_sum_request.contributions[0])
    with pytest.raises(m.ProtocolError, match="one contribution and one ciphertext blob per"):
        m.check_body(env)


@pytest.mark.parametrize(
    "statement",
    [pickle.dumps({"round": 1}), b"{" + pickle.dumps({"round": 1}), b"[1]"],
    ids=["pickle", "pickle-behind-brace", "json-list"],
)
def test_a_share_sum_request_with_a_pickled_statement_is_refused(statement):
    with pytest.raises(m.ProtocolError, match="not a signed JSON statement"):
        m.check_body(_share_sum_request(statement=statement))


def test_a_share_sum_request_with_a_short_contribution_signature_is_refused():
    env = _share_sum_request()
    env.share_sum_request.contributions[1].signature = b"s" * 63
    with pytest.raises(m.ProtocolError, match="contribution signature has 63 bytes"):
        m.check_body(env)


def test_a_share_sum_request_for_share_sums_carries_no_ciphertexts():
    with pytest.raises(m.ProtocolError, match="one contribution per update, no ciphertexts"):
        m.check_body(_share_sum_fast(ciphertexts=2))


def test_a_partial_decryption_request_carries_no_sealed_shares():
    env = _share_sum_request()
    env.share_sum_request.sealed_shares.append(_sealed_share("u2", 1))
    with pytest.raises(m.ProtocolError, match="for partial decryptions carries sealed shares"):
        m.check_body(env)


def test_a_share_sum_request_of_an_unknown_opening_is_refused():
    env = _share_sum_request()
    env.share_sum_request.opening = 7
    with pytest.raises(m.ProtocolError, match="unknown opening 7"):
        m.check_body(env)


@pytest.mark.parametrize(
    "sealed, reason",
    [
        ([_sealed_share("u3", 1)], "sealed share of update 'u3' it does not name"),
        ([_sealed_share("u2", 0)], "for holder 0"),
        ([_sealed_share("u2", 1), _sealed_share("u2", 1)], "two sealed shares of one update"),
        ([_sealed_share("u2", 1, ephemeral_public=b"e" * 33)], "ephemeral key has 33 bytes"),
        ([_sealed_share("u2", 1, nonce=b"n" * 16)], "nonce has 16 bytes"),
        ([_sealed_share("u2", 1, sealed=pb.BlobRef(blob_id="x", size=1))], "sha256 has 0"),
        ([_sealed_share("u.2", 1)], "not an identifier"),
    ],
    ids=["unnamed-update", "holder-0", "twice", "short-point", "long-nonce", "no-digest", "dot"],
)
def test_a_bad_sealed_share_is_refused_by_the_schema(sealed, reason):
    with pytest.raises(m.ProtocolError, match=reason):
        m.check_body(_share_sum_fast(sealed=sealed))


def test_a_train_reply_may_seal_shares_of_its_own_update_only():
    env = _train_reply(sealed_shares=[_sealed_share("u2", 2)])
    with pytest.raises(m.ProtocolError, match="train reply: a sealed share of update 'u2'"):
        m.check_body(env)


@pytest.mark.parametrize(
    "certificates, reason",
    [
        ({"b": b""}, "certificate is empty or over"),
        ({"b": b"x" * (m.MAX_CERTIFICATE_BYTES + 1)}, "certificate is empty or over"),
        ({"a.b": b"x"}, "certificate's site id"),
    ],
    ids=["empty", "oversized", "dotted-id"],
)
def test_a_train_request_with_a_bad_certificate_entry_is_refused(certificates, reason):
    with pytest.raises(m.ProtocolError, match=reason):
        m.check_body(_train_request(site_certificates=certificates))


def test_a_share_sum_reply_without_an_answer_is_refused():
    env = _envelope(in_reply_to=3, share_sum_reply=pb.ShareSumReply(round=1, holder_id="a"))
    with pytest.raises(m.ProtocolError, match="carries no answer"):
        m.check_body(env)


def test_v1s_ciphertext_sum_is_gone_from_the_share_sum_request():
    assert "ciphertext_sum" not in pb.ShareSumRequest.DESCRIPTOR.fields_by_name
    assert 4 not in pb.ShareSumRequest.DESCRIPTOR.fields_by_number


# --- SiteHandle --------------------------------------------------------------------------


class _Recorder:
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def remote(self, *args):
        self.calls.append((self.name, args))
        return f"ref-of-{self.name}"


class FakeHub:
    """Records what a handle forwards; picklable (module level, plain attributes)."""

    def __init__(self):
        self.calls: list = []
        for name in HANDLE_METHODS:
            setattr(self, name, _Recorder(name, self.calls))


def test_a_handle_forwards_each_call_to_the_hub_with_its_site_index():
    hub = FakeHub()
    handle = SiteHandle(hub, 2, "c")
    assert handle.train.remote("task", "weights") == "ref-of-train"
    assert handle.approve.remote(4, ["u1", "u2"]) == "ref-of-approve"
    handle.partial_decrypt.remote(4, ["u1"], {0: b"s"}, [b"p"])
    handle.sealed_payload.remote(4, "u1")
    handle.share_sum.remote(4, ["u1", "u2"], {0: b"s"})
    assert hub.calls == [
        ("train", (2, "task", "weights")),
        ("approve", (2, 4, ["u1", "u2"])),
        ("partial_decrypt", (2, 4, ["u1"], {0: b"s"}, [b"p"])),
        ("sealed_payload", (2, 4, "u1")),
        ("share_sum", (2, 4, ["u1", "u2"], {0: b"s"})),
    ]
    assert repr(handle) == "SiteHandle(c)"


@pytest.mark.parametrize(
    "name",
    [
        "__ray_call__",
        "__ray_terminate__",
        "configure_crypto",
        "install",
        "deposit",
        "open_round",
        "register",
        "set_weight_ref",
        "close",
        "wait_for_sites",
        "_index_",
    ],
)
def test_a_handle_has_no_method_outside_the_closed_list(name):
    assert name not in HANDLE_METHODS
    handle = SiteHandle(FakeHub(), 0, "a")
    with pytest.raises(AttributeError, match=f"no method '{name}'"):
        getattr(handle, name)
    assert not hasattr(handle, name)


def test_the_closed_list_is_what_a_round_needs():
    assert {
        "train",
        "approve",
        "sealed_payload",
        "partial_decrypt",
        "share_sum",
        "attest",  # model checks: a holder attests the opened sum
        "attestation_key",  # its site's manifest key, which every site checks it with
        "ready",
        "trainable",
        "holds",  # before the approvals: is the session that sent the update still there
    } == HANDLE_METHODS


def test_a_handle_pickles_with_its_hub_and_index():
    handle = SiteHandle(FakeHub(), 1, "b")
    copy = pickle.loads(pickle.dumps(handle))
    assert isinstance(copy, SiteHandle) and copy.site_id == "b"
    copy.ready.remote()
    copy.train.remote("t", "w")
    assert copy._hub.calls == [("ready", (1,)), ("train", (1, "t", "w"))]
    assert handle._hub.calls == []  # the copy's hub is its own


# --- the site's and the coordinator's configuration --------------------------------------

SITE = [
    "federation=cross_org",
    "federation.party=a",
    "federation.connect=127.0.0.1:7443",
    "dataset.weight_ref=100",
]
COORDINATOR = ["federation=cross_org", "dataset.weight_ref=100"]


def _one_line_error(check, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        check(compose(overrides))
    text = str(err.value)
    assert text and "\n" not in text
    return text


def test_a_good_site_and_coordinator_config_pass():
    check_site_config(compose(SITE))
    check_coordinator_config(compose(COORDINATOR))
    check_coordinator_config(compose([*COORDINATOR, "privacy=dp"]))  # client-level DP


def test_cross_org_opens_sums_by_the_fast_path_by_default_and_partial_decryption_on_request():
    cfg = compose(COORDINATOR)
    assert cfg.crypto.fast_decrypt is True and cfg.crypto.host_sum is True
    assert compose(SITE).crypto.fast_decrypt is True
    check_coordinator_config(compose([*COORDINATOR, "crypto.fast_decrypt=false"]))
    check_site_config(compose([*SITE, "crypto.fast_decrypt=false"]))


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["federation=none"], "runs federation=cross_org only"),
        (["federation.party=null"], "needs federation.party"),
        (["federation.connect=null"], "federation.connect"),
        (["crypto=none"], "needs crypto=paillier with crypto.custody=threshold"),
        (["crypto.custody=shared"], "needs crypto=paillier with crypto.custody=threshold"),
        (["dataset.weight_ref=null"], "set dataset.weight_ref"),
        (
            ["dataset=csv", "dataset.path='t/site_{client_id}.csv'", "dataset.label=y"],
            "dataset=csv needs dataset.features, the column names every site agreed on",
        ),
        (
            ["dataset=csv", "dataset.label=y", "dataset.features=[a,b]", "dataset.num_classes=2"],
            "dataset.path must be set for dataset=csv",  # a site reads its own tables
        ),
    ],
    ids=[
        "not-cross-org",
        "no-party",
        "no-connect",
        "crypto-none",
        "shared-custody",
        "no-ref",
        "csv-no-features",
        "csv-no-path",
    ],
)
def test_a_bad_site_config_is_one_config_error(overrides, says):
    assert says in _one_line_error(check_site_config, [*SITE, *overrides])


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["crypto=none"], "needs crypto=paillier with crypto.custody=threshold"),
        (["crypto.custody=shared"], "needs crypto=paillier with crypto.custody=threshold"),
        (["crypto.host_sum=false"], "needs crypto.host_sum=true"),
        (
            ["dataset=csv", "dataset.path='t/site_{client_id}.csv'", "dataset.label=y"],
            "dataset=csv needs dataset.features, the column names every site agreed on",
        ),
        (["privacy=dp", "privacy.mode=sample"], "privacy.mode=client only"),
    ],
    ids=["crypto-none", "shared-custody", "no-host-sum", "csv", "sample-dp"],
)
def test_a_bad_coordinator_config_is_one_config_error(overrides, says):
    assert says in _one_line_error(check_coordinator_config, [*COORDINATOR, *overrides])


# --- the fast path: exponent shares sealed to the receiving site ---------------------------

FED_SITES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def share_fed(tmp_path_factory, threshold_key):
    """A federation of hub and sites a, b, c (the certs tool's files), the test key (2 of
    3), and site a's update of round 1 with one exponent-share blob per holder, signed
    with a's manifest key as its host signs it (``share_sha256``: one digest per holder)."""
    from cryptography.hazmat.primitives import serialization

    from fedray.crypto.codec import PackedPaillierCodec
    from fedray.crypto.secure_aggregation import ClientEncryptor, UpdateLayout

    certs_dir = tmp_path_factory.mktemp("shares") / "certs"
    certs.make_federation(certs_dir, "hub", FED_SITES, clients={s: 2 for s in FED_SITES})
    key, shares = threshold_key
    codec = PackedPaillierCodec.for_key(key.public, num_values=8, max_summands=6)
    encryptor = ClientEncryptor(key, UpdateLayout.for_key(key.public, codec))
    a_key = serialization.load_pem_private_key((certs_dir / "a/signing.key").read_bytes(), None)
    a_host = HostIdentity.from_private_key(a_key)

    def update(round_num: int, update_id: str):
        import numpy as np

        enc, blobs = encryptor.encrypt_sum([(np.full(8, 0.1), 1.0, None, {})] * 2)
        c = Contribution(
            key.fingerprint,
            round_num,
            update_id,
            0,
            (0, 1),
            digest(enc.ciphertexts),
            tuple(digest(b) for b in blobs),
            "m" * 64,
        )
        return a_host.sign(c), blobs

    return certs_dir, key, shares, update


def _context(certs_dir, key, recipient="b", **kw):
    from fedray.federation.channel import Manifest
    from fedray.federation.shares import ShareContext, manifest_sha256

    manifest = Manifest.load(certs_dir / "federation.json")
    fields = dict(
        key_fingerprint=key.fingerprint,
        manifest_sha256=manifest_sha256(certs_dir / "federation.json"),
        round=1,
        update_id="u1",
        sender="a",
        recipient=recipient,
        holder=FED_SITES.index(recipient) + 1,
        recipient_cert_sha256=manifest.sites[recipient].cert_sha256,
    )
    fields.update(kw)
    return ShareContext(**fields)


def _seal_to(certs_dir, key, share: bytes, recipient="b", **kw):
    from fedray.federation.channel import Manifest
    from fedray.federation.shares import recipient_key, seal_share

    expected = Manifest.load(certs_dir / "federation.json").sites[recipient].cert_sha256
    public = recipient_key((certs_dir / recipient / "cert.pem").read_bytes(), recipient, expected)
    return seal_share(public, _context(certs_dir, key, recipient, **kw), share)


def _tls_key(certs_dir, party):
    from fedray.tools.keys import _site_private_key

    return _site_private_key(certs_dir / party / "key.pem")


def test_a_share_sealed_to_site_b_opens_at_b_only(share_fed):
    """Site b opens it with its own TLS key; site c (with its own key and its own holder's
    context) and the coordinator (its own key) cannot, and the sealed bytes do not hold
    the share."""
    from fedray.federation.shares import ShareSealError, open_share

    certs_dir, key, _, update = share_fed
    signed, blobs = update(1, "u1")
    sealed = _seal_to(certs_dir, key, blobs[1])
    assert sealed.holder == 2 and blobs[1] not in sealed.sealed
    assert len(sealed.sealed) == len(blobs[1]) + 16
    context = _context(certs_dir, key)
    assert open_share(_tls_key(certs_dir, "b"), context, sealed, len(blobs[1])) == blobs[1]
    for party, ctx in [
        ("c", context),
        ("c", _context(certs_dir, key, "c", holder=2)),
        ("hub", context),
    ]:
        with pytest.raises(ShareSealError, match="does not open with this site's key"):
            open_share(_tls_key(certs_dir, party), ctx, sealed)


@pytest.mark.parametrize(
    "change",
    [
        {"update_id": "u2"},
        {"round": 2},
        {"sender": "c"},
        {"key_fingerprint": "f" * 16},
        {"manifest_sha256": "0" * 64},
    ],
    ids=["other-update", "other-round", "other-sender", "other-key", "other-manifest"],
)
def test_a_sealed_share_moved_to_another_update_round_or_sender_does_not_open(share_fed, change):
    """The coordinator relays a share as it was sealed: what b expects (from the signed
    contribution it is deposited with, and its own files) is bound into the seal."""
    from fedray.federation.shares import ShareSealError, open_share

    certs_dir, key, _, update = share_fed
    _, blobs = update(1, "u1")
    sealed = _seal_to(certs_dir, key, blobs[1])
    with pytest.raises(ShareSealError, match="does not open with this site's key"):
        open_share(_tls_key(certs_dir, "b"), _context(certs_dir, key, **change), sealed)


def test_a_share_for_another_holder_index_is_refused(share_fed):
    """Holder 3's share (sealed to site c) presented to holder 2: refused on its index
    before anything is opened."""
    from fedray.federation.shares import ShareSealError, open_share

    certs_dir, key, _, update = share_fed
    _, blobs = update(1, "u1")
    sealed = _seal_to(certs_dir, key, blobs[2], recipient="c")
    with pytest.raises(ShareSealError, match="is for holder 3, not 2"):
        open_share(_tls_key(certs_dir, "b"), _context(certs_dir, key), sealed)


def test_a_sealed_share_of_another_size_is_refused_before_it_is_opened(share_fed):
    from fedray.federation.shares import ShareSealError, open_share

    certs_dir, key, _, update = share_fed
    _, blobs = update(1, "u1")
    sealed = _seal_to(certs_dir, key, blobs[1] + b"\0")
    with pytest.raises(ShareSealError, match="not the .* of a share of this update"):
        open_share(_tls_key(certs_dir, "b"), _context(certs_dir, key), sealed, len(blobs[1]))


def test_a_relayed_certificate_that_is_not_the_manifests_is_refused(share_fed):
    """A site seals only to the certificate the manifest names for the recipient."""
    from fedray.federation.channel import Manifest
    from fedray.federation.shares import ShareSealError, recipient_key

    certs_dir = share_fed[0]
    expected = Manifest.load(certs_dir / "federation.json").sites["b"].cert_sha256
    for pem in [(certs_dir / "c/cert.pem").read_bytes(), b"not a certificate"]:
        with pytest.raises(ShareSealError, match="not site b's certificate|not a PEM"):
            recipient_key(pem, "b", expected)


@pytest.fixture
def holder_b(share_fed):
    """Site b's key holder (holder 2 of 3): the manifest's site keys as its peers, a's
    clients 0-1, b's 2-3, c's 4-5; round 1 opened by b's agent."""
    from fedray.federation.channel import Manifest
    from fedray.runtime.keys import KeyHolder, round_ticket_message

    certs_dir, key, shares, _ = share_fed
    manifest = Manifest.load(certs_dir / "federation.json")
    agent = HostIdentity()
    holder = KeyHolder(
        2,
        {h: manifest.sites[s].signing_key for h, s in enumerate(FED_SITES)},
        {c: c // 2 for c in range(6)},
        2,
        agent.public_bytes(),
        max_rounds=3,
    )
    holder.install(key, shares[1])
    for r in (1, 2):
        holder.open_round(r, agent.sign_bytes(round_ticket_message(key.fingerprint, r)))
    return holder


def _flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


@pytest.mark.parametrize("which", ["swapped", "altered", "replayed", "holder-1", "holder-3"])
def test_the_holder_refuses_a_share_that_is_not_the_one_signed_for_it(share_fed, holder_b, which):
    """What the opened share is checked against is the digest a's host signed for holder 2
    in the contribution: another update's share (swapped), a changed byte (altered), the
    share of an earlier round's update (replayed), or another holder's share are refused,
    and the update is not deposited (its right share is then taken)."""
    _, _, _, update = share_fed
    signed, blobs = update(2, "h0-u2")
    other, other_blobs = update(2, "h0-u3")
    earlier, earlier_blobs = update(1, "h0-u0")
    wrong = {
        "swapped": other_blobs[1],
        "altered": _flip(blobs[1]),
        "replayed": earlier_blobs[1],
        "holder-1": blobs[0],
        "holder-3": blobs[2],
    }[which]
    with pytest.raises(PermissionError, match="exponent shares do not match the signed digest"):
        holder_b.deposit(signed, wrong)
    assert holder_b.deposit(signed, blobs[1])


def test_a_share_attaches_once_to_the_same_contribution_deposited_without_it(share_fed, holder_b):
    """A site deposits relayed contributions without shares for a partial-decryption
    request; if that request fails (a hostile coordinator sends one with missing
    approvals), the later share-sum request must still attach the holder's share: the very
    same signed contribution takes its signed share once. Review of 2026-12-04: before,
    the update stayed share-less and the fast path was off for that round."""
    _, _, _, update = share_fed
    signed, blobs = update(2, "h0-u2")
    assert holder_b.deposit(signed, None)
    # a second contribution its host signed under the same id never replaces the first
    twin, twin_blobs = update(2, "h0-u2")
    with pytest.raises(PermissionError, match="already deposited"):
        holder_b.deposit(twin, twin_blobs[1])
    with pytest.raises(PermissionError, match="exponent shares do not match the signed digest"):
        holder_b.deposit(signed, _flip(blobs[1]))  # only the signed share attaches
    assert holder_b.deposit(signed, blobs[1])
    with pytest.raises(PermissionError, match="already deposited"):
        holder_b.deposit(signed, blobs[1])  # once
    with pytest.raises(PermissionError, match="already deposited"):
        holder_b.deposit(signed, None)


@pytest.mark.parametrize("bad", ["too-large", "ragged"])
def test_the_holder_refuses_exponent_shares_no_honest_sharing_makes(share_fed, holder_b, bad):
    """A host's share blob that matches its signed digest but holds a value above the
    bound of an honest sharing (all 0xFF bytes) would overflow every holder's share sum,
    and the honest sites would be the ones seen failing; a blob that is not whole values
    cannot be summed. Both are refused at deposit, naming the host (review, 2026-12-04)."""
    from cryptography.hazmat.primitives import serialization

    certs_dir, key, _, update = share_fed
    signed, blobs = update(2, "h0-u2")
    width = key.share_width()
    wrong = b"\xff" * len(blobs[1]) if bad == "too-large" else blobs[1][: width + 1]
    c = signed.contribution
    shares = list(c.share_sha256)
    shares[1] = digest(wrong)
    a_key = serialization.load_pem_private_key((certs_dir / "a/signing.key").read_bytes(), None)
    forged = HostIdentity.from_private_key(a_key).sign(
        Contribution(
            c.key_id,
            c.round,
            c.update_id,
            c.host,
            c.client_ids,
            c.ciphertext_sha256,
            tuple(shares),
            c.model_sha256,
        )
    )
    message = "exceed the bound" if bad == "too-large" else "not whole values"
    with pytest.raises(PermissionError, match=f"host 0's exponent shares .*{message}"):
        holder_b.deposit(forged, wrong)
    assert holder_b.deposit(signed, blobs[1])  # an honest sharing is taken


# --- the coalition a site defends against (federation.max_colluding_sites) ---------------


def _agent_for(sites: list[str], threshold: int, k):
    """A SiteAgent of site ``sites[0]`` with just what its coalition checks read."""
    import types

    from fedray.federation.site import SiteAgent

    agent = SiteAgent.__new__(SiteAgent)
    agent.job_sha256 = ""  # what the contributions below declare (none)
    agent.cfg = types.SimpleNamespace(federation=types.SimpleNamespace(max_colluding_sites=k))
    agent.key = types.SimpleNamespace(threshold=threshold)
    agent.paths = types.SimpleNamespace(sites=sites)
    agent.policy = None
    return agent


def _sum_of(hosts: list[int]) -> list[SignedContribution]:
    return [SignedContribution(_contribution(host=h, update_id=f"h{h}-x"), b"") for h in hosts]


def test_the_default_coalition_is_t_minus_1_and_a_sum_needs_it_plus_2_sites():
    """null (the default) defends against t - 1 colluding sites: with a 3-of-5 key a site
    signs no sum of 3 sites (2 colluders and the victim would subtract to its update), and
    a sum of 4 passes; an explicit value is taken as given."""
    from fedray.federation import channel as ch

    assert compose(["federation=cross_org"]).federation.max_colluding_sites is None
    agent = _agent_for(list("abcde"), threshold=3, k=None)
    assert agent.colluding_sites() == 2
    with pytest.raises(ch.Refused, match=r"sum of 3 site\(s\).*at least 4 sites, .*t - 1 = 2\)"):
        agent._check_sum(1, _sum_of([0, 1, 2]))
    agent._check_sum(1, _sum_of([0, 1, 2, 3]))
    agent = _agent_for(list("abcde"), threshold=3, k=0)
    assert agent.colluding_sites() == 0
    agent._check_sum(1, _sum_of([0, 1]))


def test_a_federation_too_small_for_its_coalition_is_refused_at_start():
    """Two sites with a 2-of-2 key: the default coalition (1 site) leaves no sum a site
    may sign, so the site refuses to start, in one line naming the allowed values."""
    with pytest.raises(ConfigError, match=r"needs at least 3 sites, and the manifest has 2") as e:
        _agent_for(["a", "b"], threshold=2, k=None)._check_coalition()
    assert "from 0 to 0" in str(e.value) and "\n" not in str(e.value)
    _agent_for(["a", "b"], threshold=2, k=0)._check_coalition()  # said explicitly: taken
    _agent_for(list("abc"), threshold=2, k=None)._check_coalition()


@pytest.mark.parametrize("bad", ["0", "0.05", "-1", "inf", "nan"])
def test_reconnect_max_s_below_a_tenth_of_a_second_or_not_finite_is_refused(bad):
    with pytest.raises(ConfigError, match=r"federation.reconnect_max_s=.* must be") as err:
        compose([*SITE, f"federation.reconnect_max_s={bad}"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [-1, -5])
def test_max_colluding_sites_must_be_a_count_or_null(bad):
    with pytest.raises(
        ConfigError, match=r"max_colluding_sites=.* must be an integer >= 0, or null"
    ):
        compose(["federation=cross_org", f"federation.max_colluding_sites={bad}"])


# --- a site's own tables (dataset=csv across organisations) -------------------------------


def _csv_site(tmp_path, labels, num_classes: int):
    """Site a's agent (clients 0 and 1) over two tables with columns f2, y, f1 (not the
    declared order) holding ``labels``."""
    from fedray.federation.site import SiteAgent

    for cid in (0, 1):
        rows = "\n".join(f"{0.5 * i},{y},{i}" for i, y in enumerate(labels))
        (tmp_path / f"t{cid}.csv").write_text(f"f2,y,f1\n{rows}\n")
    agent = SiteAgent.__new__(SiteAgent)
    agent.job_sha256 = ""  # what the contributions below declare (none)
    agent.cfg = compose(
        [
            *SITE,
            "dataset=csv",
            f"dataset.path='{tmp_path}/t{{client_id}}.csv'",
            "dataset.label=y",
            "dataset.features=[f1,f2]",
            f"dataset.num_classes={num_classes}",
        ]
    )
    agent.site_id, agent.client_ids = "a", [0, 1]
    return agent


def test_a_sites_model_shape_is_the_declared_one_not_its_own_tables(tmp_path):
    """Labels 0 and 1 only at this site, 4 classes declared: the site's model has the
    federation's 4 outputs (its own tables would say 2) and the declared features' width."""
    info = _csv_site(tmp_path, [0, 1, 1, 0], num_classes=4).data_info()
    assert (info.num_features, info.num_classes) == (2, 4)


def test_a_site_with_a_label_outside_the_declared_classes_refuses_to_start(tmp_path):
    from fedray.errors import DataError

    with pytest.raises(DataError, match=r"site a: its tables hold label 3; .*allows labels 0\.\.2"):
        _csv_site(tmp_path, [0, 3, 1, 2], num_classes=3).data_info()


# --- the coordinator checks a site's statement when its train reply arrives ---------------


def test_the_coordinator_names_a_site_whose_statement_the_holders_would_refuse():
    from fedray.federation.coordinator import statement_problem

    site, other = HostIdentity(), HostIdentity()

    def signed(**kw):
        c = _contribution(**{"update_id": "h1-" + "ab" * 16, "round": 3, "host": 1, **kw})
        return c.message(), site.sign(c).signature

    args = (site.public_bytes(), 1, "k" * 16, 3, {2, 3})
    assert statement_problem(*signed(), *args) == ""
    statement, signature = signed()
    assert "manifest key" in statement_problem(statement, other.sign_bytes(statement), *args)
    assert "another key, round or host" in statement_problem(*signed(round=4), *args)
    assert "another key, round or host" in statement_problem(*signed(host=2), *args)
    assert "not in the site's namespace" in statement_problem(
        *signed(update_id="h2-" + "ab" * 16), *args
    )
    assert "not asked to train (7)" in statement_problem(*signed(client_ids=(2, 7)), *args)
    assert "JSON" in statement_problem(b"not json", signature, *args)
    # across organisations each statement carries its site's declared job's digest
    ours = "ab" * 32
    assert statement_problem(*signed(job_sha256=ours), *args, ours) == ""
    assert "under another job" in statement_problem(*signed(job_sha256="cd" * 32), *args, ours)
    assert "under another job" in statement_problem(*signed(), *args, ours)


def test_a_holder_takes_contributions_of_its_own_sites_job_only(share_fed):
    """A coordinator can echo each site's declared job back to it, so two sites may have
    been told different jobs. Each host signs its job's digest into every contribution,
    and a key holder given its site's digest refuses a contribution of another job (and
    one that names none), so no sum mixes updates of two jobs."""
    import dataclasses

    from cryptography.hazmat.primitives import serialization

    from fedray.federation.channel import Manifest
    from fedray.runtime.keys import KeyHolder, round_ticket_message

    certs_dir, key, shares, update = share_fed
    manifest = Manifest.load(certs_dir / "federation.json")
    a_key = serialization.load_pem_private_key((certs_dir / "a/signing.key").read_bytes(), None)
    a_host = HostIdentity.from_private_key(a_key)
    agent, ours = HostIdentity(), "ab" * 32
    holder = KeyHolder(
        2,
        {h: manifest.sites[s].signing_key for h, s in enumerate(FED_SITES)},
        {c: c // 2 for c in range(6)},
        2,
        agent.public_bytes(),
        max_rounds=3,
        job_sha256=ours,
    )
    holder.install(key, shares[1])
    holder.open_round(1, agent.sign_bytes(round_ticket_message(key.fingerprint, 1)))
    signed, blobs = update(1, "h0-" + "1" * 32)
    for job in ("", "cd" * 32):
        other = a_host.sign(dataclasses.replace(signed.contribution, job_sha256=job))
        with pytest.raises(PermissionError, match="made under another job"):
            holder.deposit(other, blobs[1])
    same = a_host.sign(dataclasses.replace(signed.contribution, job_sha256=ours))
    assert holder.deposit(same, blobs[1]) is True


def test_a_site_records_the_rounds_it_took_part_in_and_never_takes_one_twice(tmp_path):
    """The durable record behind a restarted site (review of 2026-12-04): rounds an
    earlier process under this key took part in are refused, in one line naming the
    file, whatever job it ran (a job with one setting changed would train round 1 alike);
    another key starts its own count; a record that is not readable, or a place that
    cannot be written, stops the site at start."""
    import threading

    from fedray.federation import channel as ch
    from fedray.federation.site import RoundRecord, SiteAgent

    path = tmp_path / "state" / "a.rounds.json"
    first = RoundRecord(path, "key1")
    assert first.floor == 0
    for r in (1, 2, 2, 3):  # a retry of a round in the same process is the same round
        first.take_part(r, "trains")
    again = RoundRecord(path, "key1")  # the site restarted (or the job runs again)
    assert again.floor == 3
    for r in (1, 3):
        with pytest.raises(ch.Refused, match=f"round {r}: this site took part in rounds up to 3"):
            again.take_part(r, "trains")
    again.take_part(4, "helps open")
    assert RoundRecord(path, "key1").floor == 4  # another job under this key: the same
    assert RoundRecord(path, "key2").floor == 0  # another key: its own rounds
    # Two processes under one key at the same time (two jobs, say): neither takes a round
    # the other has recorded, though both started below it (review of 2026-12-04, third)
    one, other = RoundRecord(path, "key3"), RoundRecord(path, "key3")
    one.take_part(1, "trains")
    one.take_part(2, "trains")
    with pytest.raises(ch.Refused, match="round 1: another process of this site took part"):
        other.take_part(1, "trains")
    other.take_part(3, "trains")
    with pytest.raises(ch.Refused, match="round 3: another process of this site took part"):
        one.take_part(3, "helps open")
    one.take_part(2, "trains")  # its own round again: a retry
    # a record an earlier fedray kept per key and job counts for the key
    legacy = tmp_path / "legacy.rounds.json"
    legacy.write_text('{"key1:jobA": 6, "key1:jobB": 2, "key2:jobA": 9}')
    assert RoundRecord(legacy, "key1").floor == 6

    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a record of rounds"):
        RoundRecord(path, "key1")
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="cannot be written"):
        RoundRecord(blocked / "a.rounds.json", "key1")

    # The agent refuses a train request of such a round before anything happens
    agent = SiteAgent.__new__(SiteAgent)
    agent.cfg = compose(SITE)
    agent.client_ids, agent.policy, agent._lock = [0, 1], None, threading.Lock()
    agent.rounds = RoundRecord(tmp_path / "b.rounds.json", "key1")
    agent.rounds.take_part(5, "trains")
    agent.rounds = RoundRecord(tmp_path / "b.rounds.json", "key1")
    env = _train_request(round=5, client_ids=[0])
    body = env.train_request
    with pytest.raises(ch.Refused, match="round 5: this site took part in rounds up to 5"):
        agent.handle(ch.Message(m.check_envelope(env), body, env, {}))  # no host, holder or
        # channel here: had the check not refused first, handle would have failed otherwise


def test_holds_says_whether_the_process_that_sealed_an_update_can_still_approve_it():
    """The server asks every host of a sum ``holds`` before any approves it: a host (one
    cluster) answers from its own sealed updates, so one Ray restarted (a fresh process)
    says False; the hub (across organisations) answers True only while the session that
    sent the round's update is the site's connected one."""
    from fedray.federation.coordinator import FederationHub
    from fedray.runtime.client import ClientHost

    host = ClientHost.__new__(ClientHost)
    host._sealed, host._sealed_round, host._approver = {"u1": b"c", "u2": b"d"}, 2, object()
    assert host.holds(2, ["u1", "u2"]) is True
    assert host.holds(2, ["u1", "u3"]) is False  # not its update
    assert host.holds(3, ["u1"]) is False  # another round
    host._sealed, host._sealed_round = {}, 0  # what a restarted process holds
    assert host.holds(2, ["u1"]) is False

    class Coord:
        def __init__(self, peers):
            self.peers = peers

        def connected(self):
            return list(self.peers)

        def site(self, site_id):
            return self.peers[site_id]

    session = object()
    hub = FederationHub.__new__(FederationHub)
    hub.sites, hub._trained = ["a", "b"], {0: (session, 2)}
    hub.coord = Coord({"a": session, "b": object()})
    assert hub.holds(0, 2, ["u1"]) is True
    assert hub.holds(0, 3, ["u1"]) is False  # it sent nothing in round 3
    assert hub.holds(1, 2, ["u2"]) is False  # b sent nothing this round
    hub.coord = Coord({"a": object()})  # a came back as a new session
    assert hub.holds(0, 2, ["u1"]) is False
    hub.coord = Coord({})  # gone
    assert hub.holds(0, 2, ["u1"]) is False


def test_a_site_dials_a_down_coordinator_at_most_reconnect_max_s_apart(
    tmp_path, caplog, monkeypatch
):
    """federation.reconnect_max_s caps a site's backoff: its waits between dials double
    from 0.5 s (or the cap, if lower) and never pass the cap, the jitter's top (+20%,
    drawn every time here) included; the last wait ends when the site gives up."""
    import logging
    import re

    from fedray.federation import channel as ch
    from fedray.federation.site import Paths, SiteAgent

    certs.make_federation(tmp_path / "c", "hub", ["a", "b", "c"], clients={s: 2 for s in "abc"})
    port = free_port()  # nothing listens there
    agent = SiteAgent.__new__(SiteAgent)
    agent.cfg = compose(
        [
            *SITE,
            f"federation.certs={tmp_path / 'c'}",
            f"federation.keys={tmp_path / 'k'}",
            f"federation.connect=127.0.0.1:{port}",
            "federation.reconnect_max_s=0.5",
        ]
    )
    agent.paths = Paths(agent.cfg, "a")
    agent.site_id = "a"
    agent._receive_cap = lambda: 1 << 20
    monkeypatch.setattr(ch.random, "uniform", lambda low, high: high)
    caplog.set_level(logging.WARNING, logger="fedray.federation")
    with pytest.raises(ch.Unreachable, match="gave up after 1.2 s"):
        agent.serve(max_wait_s=1.2)
    waits = [float(w) for w in re.findall(r"retrying in ([0-9.]+) s", caplog.text)]
    assert len(waits) >= 3 and max(waits) <= 0.5, waits
    assert sum(waits) <= 1.2 + 0.1, waits  # 0.5, 0.5, then what is left: 0.2
