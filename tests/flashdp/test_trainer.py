"""DPTrainer end to end on a tiny Llama: Poisson batches, DPOptimizer steps, ε logged each epoch."""

import pytest
import torch
from opacus.accountants import RDPAccountant
from transformers import default_data_collator

import flashdp
from flashdp.trainer import DPTrainer, DPTrainingArguments

N, SEQ, VOCAB = 32, 8, 50


def dataset():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (N, SEQ), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(N)]


def dp_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-2,
                num_train_epochs=2, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0, dp_delta=1e-5,
                dp_accountant="rdp", seed=11, report_to=[], logging_strategy="epoch", save_strategy="no",
                use_cpu=True, disable_tqdm=True)
    base.update(kw)
    return DPTrainingArguments(**base)


def test_dptrainer_trains_and_logs_epsilon_each_epoch(tmp_path, make_llama):
    model = make_llama()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DPTrainer(model=model, args=dp_args(tmp_path), train_dataset=dataset(),
                        data_collator=default_data_collator)
    assert flashdp.privacy_state(model) is not None  # made private by the trainer
    trainer.train()
    opt = trainer.optimizer.optimizer  # accelerate's wrapper around the DPOptimizer
    assert isinstance(opt, flashdp.DPOptimizer)
    steps_per_epoch = len(trainer.get_train_dataloader())
    assert steps_per_epoch == N // 8 and opt.steps == 2 * steps_per_epoch
    eps_logged = [h["dp_epsilon"] for h in trainer.state.log_history if "dp_epsilon" in h and "loss" in h]
    assert len(eps_logged) == 2  # one entry per epoch
    # independent accounting: Opacus's RDP accountant over the same steps
    for epoch, eps in enumerate(eps_logged, start=1):
        acct = RDPAccountant()
        for _ in range(epoch * steps_per_epoch):
            acct.step(noise_multiplier=1.0, sample_rate=8 / N)
        assert eps == pytest.approx(acct.get_epsilon(delta=1e-5), rel=1e-9)
    assert eps_logged[1] > eps_logged[0] > 0
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())


def test_dptrainer_step_is_dp_sgd_on_the_poisson_batch(tmp_path, ref, make_llama):
    """σ = 0, SGD: one step moves each parameter by −lr · (Σ_b clip(g_b)) / expected batch size."""
    model = make_llama()
    args = dp_args(tmp_path, dp_noise_multiplier=0.0, max_steps=1, optim="sgd", learning_rate=0.5,
                   lr_scheduler_type="constant", weight_decay=0.0)
    trainer = DPTrainer(model=model, args=args, train_dataset=dataset(), data_collator=default_data_collator)
    batch = next(iter(trainer.get_train_dataloader()))  # same generator seed: the batch train() draws first
    before = make_llama()
    ids = batch["input_ids"]
    want, _, _ = ref.per_sample_clipped_sum(before, lambda m, b: m(input_ids=ids[b:b + 1], labels=ids[b:b + 1]).loss,
                                            ids.shape[0], 1.0)
    trainer.train()
    for n, p in model.named_parameters():
        p0 = dict(before.named_parameters())[n].double()
        torch.testing.assert_close(p.double(), p0 - 0.5 * want[n] / 8, rtol=1e-4, atol=1e-6, msg=n)


def test_dptrainer_refuses_trainer_clipping_and_accumulation(tmp_path, make_llama):
    for kw, match in ((dict(max_grad_norm=1.0), "max_grad_norm"), (dict(gradient_accumulation_steps=2), "accum")):
        with pytest.raises(ValueError, match=match):
            DPTrainer(model=make_llama(), args=dp_args(tmp_path, **kw), train_dataset=dataset(),
                      data_collator=default_data_collator)


def test_scheduler_follows_dpoptimizer_after_load_state_dict():
    model = flashdp.make_private(torch.nn.Linear(3, 2), 1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                              expected_batch_size=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.load_state_dict(opt.state_dict())
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == 0.5


def test_target_epsilon_calibrates_sigma_once(tmp_path, make_llama, monkeypatch):
    """σ from dp_target_epsilon: the accountant spends at most the target over the run (and just under it),
    and the search runs once however often the trainer reads σ."""
    import flashdp.trainer as trainer_module

    calls = []
    real = trainer_module.get_noise_multiplier

    def counted(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(trainer_module, "get_noise_multiplier", counted)
    args = dp_args(tmp_path, dp_noise_multiplier=None, dp_target_epsilon=3.0, num_train_epochs=2)
    trainer = DPTrainer(model=make_llama(), args=args, train_dataset=dataset(), data_collator=default_data_collator)
    sigma = trainer.noise_multiplier
    assert trainer.noise_multiplier == sigma and len(calls) == 1
    steps = 2 * N // 8  # epochs / sample rate
    acct = RDPAccountant()
    for _ in range(steps):
        acct.step(noise_multiplier=sigma, sample_rate=8 / N)
    # Opacus's search stops within its epsilon_tolerance (0.01) below the target
    assert 3.0 - 0.01 <= acct.get_epsilon(delta=1e-5) <= 3.0
    # The optimizer the trainer builds adds std σ·C_total (= σ·C with the default thresholds) on every coordinate,
    # so the calibrated σ is the mechanism's multiplier: measured on zero clipped sums (no backward).
    opt = trainer.create_optimizer()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in params]).double() * opt.expected_batch_size
    n = noise.numel()
    # the sample std of n normals is within 5 standard errors (1/√(2n) relative) with probability 1 − 6e-7
    assert noise.std().item() == pytest.approx(sigma * 1.0, rel=5 / (2 * n) ** 0.5)
    assert opt.noise_std == pytest.approx(sigma * 1.0, rel=1e-12)


class _ScaledGradientTrainer(DPTrainer):
    """The same loss value, its gradient scaled by ``gradient_scale``: only the private gradients differ."""

    gradient_scale = 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        return loss + (self.gradient_scale - 1.0) * (loss - loss.detach())


TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}


def _logged(tmp_path, make_llama, scale: float) -> list[dict]:
    # lr = 0: the parameters never move, so both runs see the same losses at every step; C is large enough that
    # no sample is clipped, so the clipped sum of the second run is 3x that of the first. The noise keys (seed)
    # are shared. Any logged value computed from the un-noised clipped sum differs between the runs.
    args = dp_args(tmp_path / str(scale), learning_rate=0.0, dp_max_grad_norm=1e6, logging_strategy="steps",
                   logging_steps=1, num_train_epochs=1)
    trainer = _ScaledGradientTrainer(model=make_llama(), args=args, train_dataset=dataset(),
                                     data_collator=default_data_collator)
    trainer.gradient_scale = scale
    trainer.train()
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in trainer.state.log_history]


def test_no_logged_value_depends_on_the_unnoised_gradient(tmp_path, make_llama):
    """The Trainer's grad_norm (the norm of the clipped sum before the noise) must not reach the logs, nor any
    other function of the private gradient: two runs whose clipped sums differ log identical entries."""
    one, three = _logged(tmp_path, make_llama, 1.0), _logged(tmp_path, make_llama, 3.0)
    assert all("grad_norm" not in entry for entry in one)
    assert len(one) == len(three) == N // 8 + 1  # a line per step and the end-of-training summary
    assert all("loss" in entry and "dp_epsilon" in entry for entry in one[:-1])
    assert one == three  # exact: the same losses (lr = 0), the same ε, the same learning rates


def test_log_refuses_a_grad_norm_entry(tmp_path, make_llama):
    trainer = DPTrainer(model=make_llama(), args=dp_args(tmp_path), train_dataset=dataset(),
                        data_collator=default_data_collator)
    with pytest.raises(RuntimeError, match=r"grad_norm.*un-noised"):
        trainer.log({"loss": 1.0, "grad_norm": 4.2})
