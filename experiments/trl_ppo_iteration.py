"""Seconds per PPO iteration of TRL's PPOTrainer (trl==1.12.0), for ``bench_ppo.py --against trl``.

Runs in TRL's own environment (torch + trl, no jax; see ``bench_ppo.py``'s docstring for how to make
it), as a separate process that ``bench_ppo.py`` starts once per TRL run. It builds four random-init
GPT-2 models of the benchmark's shape (policy and reference ``GPT2LMHeadModel``, value and reward
``GPT2ForSequenceClassification`` with one label), a dataset of random fixed-length prompts (no
padding), and trains ``--warmup + --iterations`` PPO updates. A callback records the clock at
``on_train_begin`` and at every ``on_step_end`` (after the update, the metrics' ``.item()`` calls
and the scheduler step); the seconds between consecutive marks are the iterations' times, and the
first ``--warmup`` are dropped. The last line printed is one JSON object::

    {"seconds": [<steady-state seconds of each timed iteration>], "torch": ..., "trl": ...}

TRL's configuration, equivalent to ``bench_ppo.bench_config``: ``per_device_train_batch_size =
batch``, ``gradient_accumulation_steps=1``, ``num_mini_batches=1``, ``num_ppo_epochs=4``,
``response_length``, ``temperature=0.7``, ``stop_token=None`` (no stop token: every response has
``response_length`` tokens), ``missing_eos_penalty=None``, ``kl_coef=0.05`` with ``kl_estimator=
"k1"``, ``gamma=1``, ``lam=0.95``, ``cliprange=0.2``, ``cliprange_value=0.2``, ``vf_coef=0.1``,
``whiten_rewards=False``, AdamW at a constant learning rate of 1e-5, no weight decay,
``num_sample_generations=0`` (no evaluation sampling), no checkpointing, no reporting.

Work TRL does that rlhf-jax's iteration does not, which this script cannot remove without editing
TRL: an entropy of the full ``[B, R, V]`` softmax in every update minibatch (under ``no_grad``);
``output_hidden_states=True`` on the policy/value forwards; the per-step ``.item()`` metric syncs
and logging. rlhf-jax, in turn, computes the sampler's log-probs inside its rollout, as TRL does
from ``generate``'s scores. TRL masks positions where a sampled token equals the pad token id
(random weights sample it with probability about ``1/V`` per token); the shapes and the arithmetic
are the same either way.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--positions", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="iterations dropped")
    parser.add_argument("--iterations", type=int, default=5, help="iterations timed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.positions,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        num_labels=1,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    policy, reference = GPT2LMHeadModel(config), GPT2LMHeadModel(config)
    value_model, reward_model = (
        GPT2ForSequenceClassification(config),
        (GPT2ForSequenceClassification(config)),
    )
    # A word-level tokenizer over the vocabulary: TRL reads only its pad and eos ids.
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t2")),
        pad_token="t0",
        eos_token="t1",
        unk_token="t2",
    )

    total = args.warmup + args.iterations
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(3, args.vocab, (args.batch * total, args.prompt_length), generator=g)
    dataset = Dataset.from_dict({"input_ids": prompts.tolist()})

    def collate(rows):  # fixed-length prompts: no padding
        return {"input_ids": torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)}

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        ppo_args = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            num_mini_batches=args.minibatches,
            num_ppo_epochs=args.epochs,
            total_episodes=args.batch * total,
            local_rollout_forward_batch_size=args.batch,
            response_length=args.response_length,
            temperature=0.7,
            stop_token=None,
            missing_eos_penalty=None,
            kl_coef=0.05,
            kl_estimator="k1",
            gamma=1.0,
            lam=0.95,
            cliprange=0.2,
            cliprange_value=0.2,
            vf_coef=0.1,
            whiten_rewards=False,
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            num_sample_generations=0,
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            disable_tqdm=True,
            use_cpu=True,
            bf16=False,
            seed=args.seed,
        )
        trainer = PPOTrainer(
            args=ppo_args,
            processing_class=tokenizer,
            model=policy,
            ref_model=reference,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=dataset,
            eval_dataset=dataset,
            data_collator=collate,
            callbacks=[Clock()],
        )
        trainer.train()
    steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    if len(steps) != total:
        raise SystemExit(f"expected {total} PPO iterations, timed {len(steps)}")
    print(
        json.dumps(
            dict(
                seconds=steps[args.warmup :],
                warmup_seconds=steps[: args.warmup],
                torch=torch.__version__,
                trl=trl.__version__,
                threads=torch.get_num_threads(),
            )
        )
    )


if __name__ == "__main__":
    main()
