"""Train allocplan's reference MoE models on text every Python install has.

No machine here can download pretrained MoE weights, so allocplan trains its own
small causal LMs on which a smaller top-k measurably hurts:

    ref-dsv2   DeepSeek-V2 architecture shaped like DeepSeek-V2-Lite's routing: first
               layer dense, 32 routed experts, top-6, 2 shared experts, MLA attention.
    ref-olmoe  OLMoE architecture: 16 experts, top-4, softmax router without renormalisation.
    ref-qwen3  Qwen3-MoE architecture, fine-grained like Qwen3-30B-A3B (8 of 128): 64 narrow
               experts, top-8, top-k weights renormalised (norm_topk_prob), every layer MoE.
    ref-deep   Mixtral architecture as deep as OLMoE-1B-7B: 16 MoE layers (every layer MoE),
               16 experts, top-4, renormalised top-k weights, narrow (hidden 64, experts of
               64) so that 1400 steps fit in 45 minutes on one thread: the reference on which
               the per-layer allocation has room to matter.

Training data (deterministic, built here): the standard library's own source files
and docstring text (data/train.txt, scripts/make_corpus.py), interleaved with a
synthetic arithmetic task ("37+45=82") whose held-out problems give an exact-match
accuracy (data/arith_eval.txt; training problems never include them). A byte-level
BPE tokenizer (digits split individually, so arithmetic is learnable) is trained
with the ``tokenizers`` library. A switch-style load-balancing loss keeps experts in
use. Fixed seeds and a schedule that depends on the step count only (never on the
clock), so the same command, torch build and thread count give the same weights.

ref-dsv2 uses DeepSeek-V2's routed scaling factor (8.0 here; DeepSeek-V2 itself uses 16 for
160 experts): without top-k renormalisation each of 32 experts gets about 1/32 of the
softmax mass, and at small scales a model this small learns to lean on its shared
experts, leaving the routed ones, and therefore k, nearly irrelevant. With the same
1700 steps, uniform half k cost 0.046 nats/token of eval NLL at 4.0 and 0.067 at 8.0.

Run (the committed checkpoints; one thread each, about 1.3 s per ref-dsv2 step on an
idle core; training.json records the wall-clock time of the committed run):
      python scripts/train_reference.py --name ref-dsv2 --steps 1700 --threads 1
      python scripts/train_reference.py --name ref-olmoe --steps 2000 --threads 1
      python scripts/train_reference.py --name ref-qwen3 --steps 1500 --batch-size 8 --threads 1
      python scripts/train_reference.py --name ref-deep --steps 1400 --threads 1

ref-qwen3 takes batches of 8 windows: on CPU its 64 small experts make a step about 2.4x as
slow per token as ref-olmoe's, and 1500 steps of 8 keep the run within 45 minutes on one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
)

ROOT = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 4096
ARITH_EVAL = ROOT / "data" / "arith_eval.txt"
ARITH_EVAL_PROBLEMS = 400
REFERENCES = ("ref-dsv2", "ref-olmoe", "ref-qwen3", "ref-deep")


def arithmetic_problems(seed: int) -> tuple[list[str], set[tuple[int, str, int]]]:
    """Held-out evaluation problems (written to data/arith_eval.txt) and their keys."""
    rng = random.Random(seed)
    held_out: dict[tuple[int, str, int], str] = {}
    while len(held_out) < ARITH_EVAL_PROBLEMS:
        a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-")
        held_out[(a, op, b)] = f"{a}{op}{b}={a + b if op == '+' else a - b}"
    return list(held_out.values()), set(held_out)


def arithmetic_lines(count: int, held_out: set, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    while len(lines) < count:
        a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-")
        if (a, op, b) not in held_out:
            lines.append(f"{a}{op}{b}={a + b if op == '+' else a - b}")
    return lines


def stdlib_source(max_chars: int) -> str:
    """Python source of the standard library (sorted files, deterministic prefix)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(chunks)[:max_chars]


def build_corpus(seed: int) -> tuple[str, list[str]]:
    prose = (ROOT / "data" / "train.txt").read_text(encoding="utf-8")
    code = stdlib_source(len(prose))
    eval_problems, held_out = arithmetic_problems(seed + 1)
    lines = arithmetic_lines(120_000, held_out, seed + 2)
    # Interleave: blocks of 40 problems between ~2 KB pieces of prose and code.
    pieces, rng = [], random.Random(seed)
    text_pieces = [prose[i : i + 2000] for i in range(0, len(prose), 2000)]
    text_pieces += [code[i : i + 2000] for i in range(0, len(code), 2000)]
    rng.shuffle(text_pieces)
    for i, piece in enumerate(text_pieces):
        pieces.append(piece)
        block = lines[(i * 40) % len(lines) : (i * 40) % len(lines) + 40]
        pieces.append("\n".join(block) + "\n")
    return "\n".join(pieces), eval_problems


def train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_config(name: str, tokenizer: PreTrainedTokenizerFast):
    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if name == "ref-dsv2":
        return DeepseekV2Config(
            hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=32, num_experts_per_tok=6,
            n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=None,
            qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, head_dim=16, topk_method="greedy",
            n_group=1, topk_group=1, routed_scaling_factor=8.0, **common,
        )
    if name == "ref-olmoe":
        return OlmoeConfig(
            hidden_size=128, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=4, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, **common,
        )
    if name == "ref-qwen3":
        return Qwen3MoeConfig(
            hidden_size=128, intermediate_size=384, moe_intermediate_size=32, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=4, head_dim=32, num_experts=64, num_experts_per_tok=8,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **common,
        )
    if name == "ref-deep":
        return MixtralConfig(
            hidden_size=64, intermediate_size=64, num_hidden_layers=16, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=16, num_experts_per_tok=4,
            router_jitter_noise=0.0, sliding_window=None, **common,
        )
    raise SystemExit(f"unknown reference model {name!r}; use one of {', '.join(REFERENCES)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, choices=REFERENCES)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--balance-coef", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the bundled model's)")
    args = parser.parse_args()

    from allocplan.runtime.layers import find_moe_layers

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    corpus, eval_problems = build_corpus(args.seed)
    if args.out is None:  # the committed checkpoints' run also writes the held-out problems
        ARITH_EVAL.write_text("\n".join(eval_problems) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer(corpus)
    ids = torch.tensor(tokenizer(corpus, add_special_tokens=False)["input_ids"], dtype=torch.long)
    model = AutoModelForCausalLM.from_config(make_config(args.name, tokenizer))
    layers = find_moe_layers(model)
    print(f"{args.name}: {sum(p.numel() for p in model.parameters())} parameters, {ids.numel()} training tokens,"
          f" {len(layers)} MoE layers", flush=True)

    router_logits: list[torch.Tensor] = []
    for layer in layers:
        layer.router.register_forward_hook(lambda _m, _a, out: router_logits.append(out[0]))

    def balance_loss() -> torch.Tensor:
        # Switch-style: num_experts * sum_e (share of top-k picks to e) * (mean probability of e).
        total = 0.0
        for logits, layer in zip(router_logits, layers):
            probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
            picks = torch.zeros_like(probs).scatter_(1, probs.topk(layer.top_k, dim=-1).indices, 1.0)
            total = total + probs.shape[1] * (picks.mean(0) / layer.top_k * probs.mean(0)).sum()
        return total / len(layers)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    warmup = 100
    start = time.time()
    model.train()
    recent_losses: list[float] = []
    for step in range(args.steps):
        # Linear warm-up, then cosine decay over the step count (no wall-clock input).
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, ids.numel() - args.seq_len - 1, (args.batch_size,), generator=generator)
        batch = torch.stack([ids[o : o + args.seq_len] for o in offsets.tolist()])
        router_logits.clear()
        lm_loss = model(input_ids=batch, labels=batch).loss
        loss = lm_loss + args.balance_coef * balance_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent_losses = (recent_losses + [lm_loss.item()])[-50:]
        if step % 50 == 0:
            print(f"step {step:5d}  lm {lm_loss.item():.4f}  lr {lr:.2e}  {time.time() - start:.0f}s", flush=True)

    model.eval()
    out = args.out or ROOT / "allocplan" / "data" / "models" / args.name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(
        json.dumps({"command": "python " + " ".join(sys.argv), "steps": args.steps, "seed": args.seed,
                    "threads": args.threads, "torch": torch.__version__,
                    "final_train_lm_loss_last_50_steps": round(sum(recent_losses) / len(recent_losses), 4),
                    "minutes": round((time.time() - start) / 60, 1)}, indent=2) + "\n"
    )
    print(f"saved {out} after {args.steps} steps", flush=True)


if __name__ == "__main__":
    main()
