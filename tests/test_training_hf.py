"""gr_fused.integrations.transformers.GRTrainer with a tiny, randomly initialized
transformers model (nothing downloaded): it trains like a plain loop with the same optimizer
and data, with and without gradient accumulation, clips the combined gradient, saves with
safetensors, and a checkpoint resumes."""
import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gr_fused  # noqa: E402
from gr_fused.integrations.transformers import GRTrainer  # noqa: E402
from equality import assert_close  # noqa: E402

N, LEN, VOCAB = 32, 8, 30


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=LEN, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, VOCAB, (N, LEN), generator=g)
        self.labels = torch.randint(0, 2, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class InOrder(GRTrainer):
    """The Trainer in dataset order, so that a plain loop can see the same batches. BERT's
    classification loss ignores the Trainer's ``num_items_in_batch``, so the Trainer is told
    to divide each micro-batch's loss by the accumulation steps itself (as for any model that
    does not take loss kwargs): each pass then yields the batch-mean gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1,
                learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0,
                max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no",
                logging_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


GR = dict(gamma=0.05, rho=0.05)


def close(model, twin, rtol, what):
    """All parameters as one vector (the attention's key bias has a gradient that is zero
    but for rounding, which Adam scales up to full steps: compared one by one it is noise)."""
    assert_close(torch.cat([p.detach().flatten() for p in model.parameters()]),
                 torch.cat([p.detach().flatten() for p in twin.parameters()]), rtol, what)


def plain_loop(model, batch, steps, **opt_kw):
    """GRAdamW driven by hand with step(closure), over the dataset in order."""
    data = Data()
    opt = gr_fused.GRAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=0.0, **GR, **opt_kw)
    for s in range(steps):
        x, y = data.ids[s * batch:(s + 1) * batch], data.labels[s * batch:(s + 1) * batch]

        def closure():
            opt.zero_grad()
            loss = model(input_ids=x, labels=y).loss
            loss.backward()
            return loss
        opt.step(closure)
    return model


def test_trainer_steps_like_a_plain_loop(tmp_path):
    model = tiny_model()
    InOrder(model=model, args=args(tmp_path), train_dataset=Data(), gr_kwargs=GR).train()
    want = plain_loop(tiny_model(), 8, N // 8)
    close(model, want, 1e-5, "trainer vs plain loop")
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny_model().parameters()))


def test_gradient_accumulation_is_gr_of_the_accumulated_batch(tmp_path):
    """Batches of 4 accumulated twice: every micro-batch runs twice and the step is the GR
    step of the batch of 8 (the plain loop, no accumulation)."""
    model = tiny_model()
    trainer = InOrder(model=model, args=args(tmp_path, per_device_train_batch_size=4,
                                             gradient_accumulation_steps=2),
                      train_dataset=Data(), gr_kwargs=GR)
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    trainer.train()
    assert len(calls) == 2 * (N // 4), "each micro-batch runs twice"
    want = plain_loop(tiny_model(), 8, N // 8)
    close(model, want, 1e-5, "trainer vs plain loop")


def test_interval_k_reuses_the_direction_between_refreshes(tmp_path):
    """gr_kwargs with interval=2: every other optimizer step takes the second gradient (its
    micro-batch runs twice), the others reuse the cached direction through the Trainer's
    plain optimizer.step(); the result is the plain loop's with interval=2."""
    model = tiny_model()
    trainer = InOrder(model=model, args=args(tmp_path), train_dataset=Data(),
                      gr_kwargs=dict(GR, interval=2))
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    trainer.train()
    steps = N // 8
    assert len(calls) == steps + (steps + 1) // 2
    want = plain_loop(tiny_model(), 8, steps, interval=2)
    close(model, want, 1e-5, "trainer vs plain loop, interval=2")


def test_max_grad_norm_clips_the_combined_gradient(tmp_path):
    model = tiny_model()
    trainer = InOrder(model=model, args=args(tmp_path, max_grad_norm=0.05),
                      train_dataset=Data(), gr_kwargs=GR)
    trainer.train()
    assert trainer.args.max_grad_norm == 0.0  # the Trainer's own clipping of g1 is off
    opt = trainer._gr_optimizer()
    assert all(g["max_grad_norm"] == 0.05 for g in opt.param_groups)
    want = plain_loop(tiny_model(), 8, N // 8, max_grad_norm=0.05)
    close(model, want, 1e-5, "trainer vs plain loop")


def test_any_gr_fused_optimizer_and_sam(tmp_path):
    model = tiny_model()
    sam = gr_fused.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2,
                       weight_decay=0.0)
    InOrder(model=model, args=args(tmp_path), train_dataset=Data(),
            optimizers=(sam, None)).train()
    twin = tiny_model()
    ref = gr_fused.SAM(twin.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2,
                       weight_decay=0.0)
    data = Data()
    for s in range(N // 8):
        x, y = data.ids[s * 8:(s + 1) * 8], data.labels[s * 8:(s + 1) * 8]
        twin(input_ids=x, labels=y).loss.backward()
        ref.step(lambda: twin(input_ids=x, labels=y).loss.backward())
        ref.zero_grad()
    close(model, twin, 1e-5, "SAM")


def test_a_plain_torch_optimizer_is_refused(tmp_path):
    model = tiny_model()
    trainer = InOrder(model=model, args=args(tmp_path), train_dataset=Data(),
                      optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(TypeError, match="gr_fused optimizer"):
        trainer.train()


def test_checkpoint_resumes_and_the_model_saves_as_safetensors(tmp_path):
    full = tiny_model()
    InOrder(model=full, args=args(tmp_path / "full"), train_dataset=Data(), gr_kwargs=GR).train()

    first = InOrder(model=tiny_model(), args=args(tmp_path / "ckpt", save_strategy="steps",
                                                  save_steps=2, max_steps=2),
                    train_dataset=Data(), gr_kwargs=GR)
    first.train()
    ckpt = tmp_path / "ckpt" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "model.safetensors").exists()
    resumed_model = tiny_model(seed=3)
    resumed = InOrder(model=resumed_model, args=args(tmp_path / "ckpt"), train_dataset=Data(),
                      gr_kwargs=GR)
    resumed.train(resume_from_checkpoint=str(ckpt))
    close(resumed_model, full, 1e-6, "resumed")

    resumed.save_model(str(tmp_path / "saved"))
    assert os.path.exists(tmp_path / "saved" / "model.safetensors")
    loaded = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    for a, b in zip(loaded.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_bf16_autocast_trains(tmp_path):
    model = tiny_model()
    before = copy.deepcopy(model)
    trainer = InOrder(model=model, args=args(tmp_path, bf16=True), train_dataset=Data(),
                      gr_kwargs=GR)
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_fp16_swaps_in_the_gr_grad_scaler(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("fp16 mixed precision in the Trainer needs a CUDA device")
    model = tiny_model().cuda()
    trainer = InOrder(model=model, args=args(tmp_path, fp16=True, use_cpu=False),
                      train_dataset=Data(), gr_kwargs=GR)
    assert isinstance(trainer.accelerator.scaler, gr_fused.amp.GradScaler)
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
