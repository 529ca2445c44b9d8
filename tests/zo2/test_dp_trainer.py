"""ZOTrainer with dp_* arguments: DPZOSGD over Poisson batches, against a hand-written DPZOSGD loop fed the
batches the Trainer drew, and Opacus's accountant stepped by hand."""

import copy

import pytest
import torch
from transformers import default_data_collator

import zo2
from zo2.trainer import ZOTrainer, ZOTrainingArguments

N_SAMPLES, SEQ, BATCH = 12, 8, 4


def dataset():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (N_SAMPLES, SEQ), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(N_SAMPLES)]


def dp_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, learning_rate=1e-2,
                lr_scheduler_type="constant", max_steps=3, zo_eps=1e-3, seed=7, report_to=[], logging_steps=1,
                save_strategy="no", use_cpu=True, disable_tqdm=True, dp_noise_multiplier=0.8, dp_max_grad_norm=0.05,
                dp_accountant="rdp")
    base.update(kw)
    return ZOTrainingArguments(**base)


class RecordingTrainer(ZOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def test_private_trainer_follows_a_hand_written_dpzosgd_loop(make_opt, tmp_path):
    """Same batches, same seed, same arithmetic: the parameters agree to the rounding of the two forward
    paths (the Trainer drops `labels` before the forward, the loop too), i.e. exactly."""
    from opacus.accountants import RDPAccountant

    model = make_opt()
    reference = copy.deepcopy(model)
    trainer = RecordingTrainer(model=model, args=dp_args(tmp_path), train_dataset=dataset(),
                               data_collator=default_data_collator)
    trainer.train()
    assert isinstance(trainer.zo, zo2.DPZOSGD) and len(trainer.seen) == 3

    opt = zo2.DPZOSGD(reference.parameters(), lr=1e-2, eps=1e-3, max_grad_norm=0.05, noise_multiplier=0.8,
                      expected_batch_size=BATCH, seed=7)
    for b in trainer.seen:
        opt.step(lambda b=b: zo2.per_sample_lm_loss(reference(input_ids=b["input_ids"]).logits, b["labels"]))
    for (n, p), r in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=0, atol=0, msg=n)

    ref = RDPAccountant()
    for _ in range(3):
        ref.step(noise_multiplier=0.8, sample_rate=BATCH / N_SAMPLES)
    assert trainer.epsilon() == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all("dp_epsilon" in e for e in logged)


def test_target_epsilon_is_met_after_the_planned_steps(make_opt, tmp_path):
    """Opacus's calibration searches σ until ε is within its tolerance (0.01) below the target."""
    trainer = ZOTrainer(model=make_opt(), args=dp_args(tmp_path, dp_noise_multiplier=None, dp_target_epsilon=2.0,
                                                       max_steps=4),
                        train_dataset=dataset(), data_collator=default_data_collator)
    trainer.train()
    assert 2.0 - 0.02 <= trainer.epsilon() <= 2.0


@pytest.mark.parametrize(("kw", "match"), [
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=1"),
    ({"dp_target_epsilon": 1.0}, "not both"),
])
def test_private_trainer_refusals(make_opt, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        ZOTrainer(model=make_opt(), args=dp_args(tmp_path, **kw), train_dataset=dataset(),
                  data_collator=default_data_collator)
