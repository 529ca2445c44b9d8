"""ZOTrainer against a hand-written ZOSGD loop: same batches, same scheduled learning rates, same parameters."""

import pytest
import torch
from transformers import default_data_collator, get_scheduler

import zo2
from zo2.trainer import ZOTrainer, ZOTrainingArguments

N_SAMPLES, SEQ = 12, 8


def dataset():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (N_SAMPLES, SEQ), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(N_SAMPLES)]


def zo_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, learning_rate=1e-2,
                lr_scheduler_type="linear", warmup_steps=1, max_steps=4, zo_eps=1e-3, seed=7, weight_decay=0.01,
                train_sampling_strategy="sequential", report_to=[], logging_steps=1, save_strategy="no",
                use_cpu=True, disable_tqdm=True)
    base.update(kw)
    return ZOTrainingArguments(**base)


def reference(make_opt, batch_size: int, accumulation: int, steps: int, seed: int = 7, offload: bool = False,
              projected: list[float] | None = None):
    """The loop a user would write: ZOSGD + the same scheduler; accumulation = one direction per micro-batch;
    ``offload`` attaches ``zo2.offload(device="cpu")`` and steps with ``accumulate=`` (one model call per closure);
    ``projected`` collects each step's projected gradient."""
    model = make_opt()
    data = dataset()
    opt = zo2.ZOSGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-3, weight_decay=0.01,
                    seed=seed, num_perturbations=1 if offload else accumulation)
    if offload:
        zo2.offload(model, opt, device="cpu", verbose=False)
    sched = get_scheduler("linear", optimizer=opt, num_warmup_steps=1, num_training_steps=steps)
    lrs = []
    pos = 0
    for _ in range(steps):
        micro = []
        for _ in range(accumulation):
            micro.append(default_data_collator(data[pos:pos + batch_size]))
            pos = (pos + batch_size) % N_SAMPLES
        if offload:
            opt.step(accumulate=[lambda m=m: model(**m).loss for m in micro])
        else:
            calls = iter(range(10**6))
            opt.step(lambda micro=micro, calls=calls: model(**micro[next(calls) // 2]).loss)
        lrs.append(opt.param_groups[0]["lr"])
        if projected is not None:
            projected.append(opt.projected_grad)
        sched.step()
    return model, lrs


def assert_same_params(a, b):
    pairs = zip(a.named_parameters(), b.named_parameters(), strict=True)
    bad = [n for (n, p), (_, q) in pairs if not torch.equal(p, q)]
    assert not bad, f"parameters differ: {bad}"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_zotrainer_matches_manual_loop(tmp_path, make_opt, accumulation):
    batch = 3 if accumulation == 1 else 2
    model = make_opt()
    start = {n: p.clone() for n, p in model.named_parameters()}
    trainer = ZOTrainer(model=model, args=zo_args(tmp_path, per_device_train_batch_size=batch,
                                                  gradient_accumulation_steps=accumulation),
                        train_dataset=dataset(), data_collator=default_data_collator)
    trainer.train()
    want, lrs = reference(make_opt, batch, accumulation, steps=4)
    assert trainer.zo.step_count == 4
    assert trainer.zo.num_perturbations == 1  # restored after each accumulated step
    assert lrs[0] < lrs[1] and lrs[1] > lrs[2] > lrs[3]  # warm-up then decay: the scheduler stepped every step
    assert_same_params(model, want)
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)


def test_logs_carry_the_projected_gradient_not_a_zero_grad_norm(tmp_path, make_opt):
    """Each step's log line holds that step's (L+ - L-) / 2ε, the value the hand-written loop's ZOSGD reports."""
    trainer = ZOTrainer(model=make_opt(), args=zo_args(tmp_path), train_dataset=dataset(),
                        data_collator=default_data_collator)
    trainer.train()
    want: list[float] = []
    reference(make_opt, 3, 1, steps=4, projected=want)
    entries = [h for h in trainer.state.log_history if "loss" in h]
    assert all("grad_norm" not in h for h in entries)
    assert [h["projected_grad"] for h in entries] == want  # exact: the same losses, in the same order
    assert all(g != 0 for g in want)


def test_evaluate_and_save_see_flushed_parameters(tmp_path, make_opt, monkeypatch):
    model = make_opt()
    trainer = ZOTrainer(model=model, args=zo_args(tmp_path, max_steps=2), train_dataset=dataset(),
                        eval_dataset=dataset()[:4], data_collator=default_data_collator)
    trainer.train()
    flushes = []
    monkeypatch.setattr(trainer.zo, "flush", lambda: flushes.append(1))
    metrics = trainer.evaluate()
    assert flushes and "eval_loss" in metrics
    flushes.clear()
    trainer.save_model(str(tmp_path / "saved"))
    assert flushes
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    for n, p in model.state_dict().items():
        if n in saved:
            assert torch.equal(saved[n], p), n


def test_resume_from_trainer_checkpoint_is_bit_exact(tmp_path, make_opt):
    full = make_opt()
    ZOTrainer(model=full, args=zo_args(tmp_path / "a", max_steps=4), train_dataset=dataset(),
              data_collator=default_data_collator).train()
    first = make_opt()
    ZOTrainer(model=first, args=zo_args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2),
              train_dataset=dataset(), data_collator=default_data_collator).train()
    resumed = make_opt(seed=123)  # different initial weights: everything must come from the checkpoint
    trainer = ZOTrainer(model=resumed, args=zo_args(tmp_path / "b", max_steps=4), train_dataset=dataset(),
                        data_collator=default_data_collator)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    assert trainer.zo.step_count == 4
    assert_same_params(resumed, full)


def test_refuses_gradient_clipping(tmp_path, make_opt):
    with pytest.raises(ValueError, match="max_grad_norm"):
        ZOTrainer(model=make_opt(), args=zo_args(tmp_path, max_grad_norm=1.0), train_dataset=dataset(),
                  data_collator=default_data_collator)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_zotrainer_with_offload_matches_an_offloaded_loop(tmp_path, make_opt, accumulation):
    """ZOTrainer attaches zo2.offload and drives it exactly as a hand-written offloaded loop does: bit for bit.

    Against *plain* ZOSGD the offloaded trajectory agrees only to the loss rounding (the deferred update is fused
    into the next step's first pass, so parameters round differently by an ulp, the losses by a few ulp(L), and
    each g by ulp(L)/ε); that agreement is tests/zo2/test_offload.py's, with tolerances derived there."""
    model = make_opt()
    trainer = ZOTrainer(model=model, args=zo_args(tmp_path / "b", gradient_accumulation_steps=accumulation,
                                                  zo_offload={"device": "cpu", "verbose": False}),
                        train_dataset=dataset(), data_collator=default_data_collator)
    trainer.train()
    assert trainer.zo.offload_engine is not None
    assert model.model.decoder.layers[0].fc1.weight.device.type == "cpu"
    want, _ = reference(make_opt, 3, accumulation, steps=4, offload=True)
    start = make_opt().state_dict()
    got, ref = model.state_dict(), want.state_dict()  # state_dict flushes on its own
    assert [n for n in got if not torch.equal(got[n], ref[n])] == []
    assert any(not torch.equal(got[n], start[n]) for n in got)
