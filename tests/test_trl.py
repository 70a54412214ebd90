"""The README's TRL route, on the real SmolLM2-135M: the adapter loaded as the README shows goes
to ``SFTTrainer`` as the model; its evaluation at step 0 is the original model's, it trains the
adapter only, and the checkpoint it saves merges into the residual and converts into a LoRA for
the original model, both giving the trained model's outputs."""

from __future__ import annotations

import pytest
import torch

from pissa_svd import decompose
from pissa_svd.convert import merge, to_lora
from pissa_svd.pipeline import ADAPTER_DIR

pytestmark = pytest.mark.slow

TEXTS = [f"Item {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(16)]


def _trainer(model, tokenizer, run_dir, steps: int = 0):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"text": TEXTS})
    args = SFTConfig(
        output_dir=str(run_dir), max_steps=max(steps, 1), save_steps=max(steps, 1),
        per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=2e-3,
        max_length=24, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
        gradient_checkpointing=False, seed=0,
    )  # fmt: skip
    return SFTTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer
    )


def test_sft_trainer_trains_the_adapter_and_its_checkpoint_merges(smollm2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    out = tmp_path / "pissa"
    decompose(smollm2, out, rank=8, residual_dtype="fp32", quiet=True)  # step 0 unrounded
    tokenizer = AutoTokenizer.from_pretrained(out)

    original = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    want = _trainer(original, tokenizer, tmp_path / "orig").evaluate()["eval_loss"]

    # As the README has it: the residual, the adapter on it, the PeftModel to SFTTrainer.
    base = AutoModelForCausalLM.from_pretrained(out)
    assert base.dtype == torch.float32  # --residual-dtype fp32 is written into config.json
    model = PeftModel.from_pretrained(base, out, subfolder=ADAPTER_DIR, is_trainable=True)
    trainer = _trainer(model, tokenizer, tmp_path / "run", steps=3)
    assert trainer.model is model
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-5)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    trainer.train()
    moved = [n for n, p in model.named_parameters() if n in before and not p.equal(before[n])]
    assert len(moved) == len(before)
    assert trainer.evaluate()["eval_loss"] < want - 0.1

    ids = tokenizer(TEXTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits
    checkpoint = tmp_path / "run" / "checkpoint-3"
    merge(out, checkpoint, tmp_path / "merged", quiet=True)
    to_lora(out / ADAPTER_DIR, checkpoint, tmp_path / "lora")
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        lora = PeftModel.from_pretrained(original, tmp_path / "lora").eval()
        converted = lora(input_ids=ids).logits
    scale = trained.abs().max()
    assert (merged - trained).abs().max() <= 1e-4 * scale
    assert (converted - trained).abs().max() <= 1e-4 * scale
