"""A guard on the models attnmt makes: the quickstart recipe, trained for its first updates on the real
Multi30k, must keep the valid BLEU recorded for it.

The quickstart once lost 1.2 test BLEU (31.18 -> 29.99) and nothing noticed. This test trains the
shipped ``experiment=quickstart`` (whatever it is: the recipe is not repeated here) for
``STEPS`` updates on 2 threads, validates as training does (greedy, the first 300 valid sentences),
and fails when that BLEU falls more than ``TOLERANCE`` below ``RECORDED``. A change that lowers it has
to say why and record the new figure; one that raises it should record the new figure too, so the
guard keeps its teeth.
"""

from __future__ import annotations

import pytest
import torch

from attnmt.config import compose

STEPS = 200
# Valid BLEU at step 200 on the 2-core AMD EPYC of CI (torch 2.13.0 CPU, 2 threads), 2026-12-06, as
# this test measured it (training on the CPU is deterministic for a given thread count). Step 200,
# not later: the recipes differ most there (the recipe before this guard, one 4096-token batch per
# update, gives 9.36 here, and this test fails on it), and the test stays within the suite's
# time (2.5 minutes; step 300 took 3.5).
RECORDED = 19.84  # lr 3e-3; 15.41 with lr 2e-3 and 13.52 with 1.5e-3, the quickstart's before
TOLERANCE = 1.0


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.data
def test_quickstart_recipe_keeps_its_valid_bleu(tmp_path, multi30k, two_threads):
    import sacrebleu

    from attnmt.data import read_lines
    from attnmt.training import train

    cfg = compose("train", [
        "experiment=quickstart", f"data.root={multi30k}", f"data.cache_dir={tmp_path / 'cache'}",
        f"train.run_dir={tmp_path / 'run'}", "train.resume=none", "train.device=cpu", "train.progress_bar=false",
        f"train.max_steps={STEPS}", f"train.valid_every={STEPS}",
    ])
    result = train(cfg)
    bleu = result["valid"]["bleu"]
    print(f"\nquickstart recipe, valid BLEU at step {STEPS}: {bleu:.2f} (recorded {RECORDED})")
    assert result["step"] == STEPS and result["valid"]["n_sentences"] == 300
    # It learns: chance, the first 300 valid references scored against each other (rotated by one), is
    # about 1 BLEU.
    references = read_lines(multi30k / "valid.en")[:300]
    assert sacrebleu.corpus_bleu(references[1:] + references[:1], [references]).score < 3 < bleu
    assert bleu >= RECORDED - TOLERANCE, (
        f"valid BLEU {bleu:.2f} at step {STEPS} is more than {TOLERANCE} below the recorded {RECORDED}: the "
        "quickstart recipe (or the code under it) got worse"
    )
