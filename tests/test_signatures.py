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
    # (overrides, signature, digest of the resolved config)
    ([], "97d170e1", "c090a1be"),
    (["model=umx"], "97d170e1", "c090a1be"),
    (["dset=toy", "variant=default"], "97d170e1", "c090a1be"),
    (["misc.num_workers=0", "misc.device=cpu"], "97d170e1", "c090a1be"),
    (["slurm.gpus=8"], "97d170e1", "c090a1be"),
    (["epochs=3"], "bdcea226", "db9947dd"),
    (["model=umx", "epochs=3"], "bdcea226", "db9947dd"),
    (["variant=finetune"], "d854b28e", "fdbefaba"),
    (["variant=example"], "b98d4da8", "0d271eb5"),
    (["dset=musdb18hq", "dset.root=/data/musdb18hq"], "49e62ede", "2b029516"),
    (["dset=folder", "dset.root=stems", "dset.sources=[speech,noise]"], "218ea0bc", "56ff8092"),
    (["dset=musdb18", "dset.root=/data/musdb18"], "42e5bac8", "3089a479"),
    (["optim.lr=0.0003", "batch_size=8"], "1a7e9015", "bca24c3c"),
    (["model.hidden_size=1024"], "c2ec44dd", "3f4b213b"),
    (["ema.decays=[0.999]"], "80c77980", "c6069989"),
    (["continue_from=0123abcd", "variant=finetune"], "f499883a", "76791f4c"),
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
