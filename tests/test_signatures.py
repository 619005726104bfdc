"""Signatures are a contract: these override lists must keep their signatures AND the resolved
configuration behind them.

Dora's signature hashes only the overrides, so editing a default in conf/ keeps every signature
but silently changes what it trains. The digest pins the resolved configuration (minus misc.*,
dora.* and slurm.*, which never affect results). If this test fails after you edited a default:
existing XPs with these signatures now mean something else. Prefer a new key or a variant; if the
change is intended, update the digests and say so in the change log.
"""
import pytest

from demixlab.experiment import config_digest
from demixlab.train import main

PINNED = [
    # (overrides, signature, digest of the resolved config). The digests of the umx, xumx and
    # slicq_cdae rows changed once, deliberately: those families now separate validation and test
    # tracks in 30 s chunks (valid.segment) instead of whole, so memory stays bounded.
    ([], "97d170e1", "7468feae"),
    (["model=umx"], "97d170e1", "7468feae"),
    (["dset=toy", "variant=default"], "97d170e1", "7468feae"),
    (["misc.num_workers=0", "misc.device=cpu"], "97d170e1", "7468feae"),
    (["slurm.gpus=8"], "97d170e1", "7468feae"),
    (["test.sdr_backend=museval"], "97d170e1", "7468feae"),  # how scores are computed, not what is trained
    (["valid.audio_every=1", "valid.audio_seconds=5"], "97d170e1", "7468feae"),  # what TensorBoard shows
    (["epochs=3"], "bdcea226", "46880a23"),
    (["model=umx", "epochs=3"], "bdcea226", "46880a23"),
    (["variant=finetune"], "d854b28e", "5bfc33d6"),
    (["variant=example"], "b98d4da8", "df9bdb55"),
    (["dset=musdb18hq", "dset.root=/data/musdb18hq"], "49e62ede", "ade4a364"),
    (["dset=folder", "dset.root=stems", "dset.sources=[speech,noise]"], "218ea0bc", "8eb2ff41"),
    (["dset=musdb18", "dset.root=/data/musdb18"], "42e5bac8", "4fb8b6eb"),
    (["optim.lr=0.0003", "batch_size=8"], "1a7e9015", "e9c164ac"),
    (["model.hidden_size=1024"], "c2ec44dd", "fdec2521"),
    (["ema.decays=[0.999]"], "80c77980", "1a2e54ca"),
    (["model=xumx"], "d0310c84", "2c264b4e"),
    (["model=xumx", "model.bridge=false", "loss.combinations=singles"], "88b5a494", "386b14cc"),
    (["model=hdemucs"], "6b862bd9", "869f1286"),
    (["model=htdemucs"], "8ad9d354", "70b05a83"),
    (["model=htdemucs", "optim.groups.transformer.lr=1e-4"], "d32197e0", "50d478c8"),
    (["model=slicq_cdae"], "21f332ca", "3a27e473"),
    (["model=slicq_cdae", "model.realtime=true"], "5a25014b", "f1da8690"),
    (["continue_from=0123abcd", "variant=finetune"], "f499883a", "bdd607f1"),
]


@pytest.mark.parametrize("overrides, signature, digest", PINNED, ids=[" ".join(o) or "defaults" for o, _, _ in PINNED])
def test_pinned_signature_and_configuration(overrides, signature, digest):
    xp = main.get_xp(overrides)
    assert xp.sig == signature, f"the signature of {overrides} changed"
    assert config_digest(xp.cfg) == digest, (
        f"the configuration behind signature {signature} ({overrides}) changed: a default in conf/ was edited")


def test_naming_a_default_group_is_the_same_xp_as_omitting_it():
    plain = main.get_xp(["epochs=5"])
    for group, default in main.default_choices().items():
        explicit = main.get_xp([f"{group}={default}", "epochs=5"])
        assert explicit.sig == plain.sig, group
        assert explicit.delta == plain.delta
