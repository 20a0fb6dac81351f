#!/usr/bin/env python
"""Is the GRPO / DPO reward of the digit-pairs testbed the bottleneck? (issue 22)

The reward without gradients (`digits.scorer.DigitPairScorer`, a scikit-learn logistic regression on 8 x 8 halves)
and the torch reward classifier of the ReFL recipe each read the held-out pairs that a sampler draws; the testbed's
evaluation classifier (the yardstick no arm trains on) reads them too. This script samples the held-out pairs with the
teacher (50 steps, CFG 3) and with any exported students, and reports for each sampler:

- the held-out pair accuracy under the evaluation classifier, the scorer and the torch reward classifier;
- how often the scorer's and the torch classifier's verdict (both halves read as prompted) equals the evaluation
  classifier's (agreement);
- the ROC AUC of the scorer's training reward (mean probability of the two prompted digits, `mode=probability`) for
  separating the pairs the evaluation classifier reads right from the others: 1 means that ranking a group's samples
  by reward ranks them exactly by held-out correctness, so a policy that climbs the reward climbs the metric.

    OMP_NUM_THREADS=1 python benchmarks/digits_scorer_agreement.py --student outputs/demo_grpo/student \\
        --output docs/rl_runs/scorer_agreement.json
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from diffusers_dmdr.digits import (
    HELD_OUT_PAIRS,
    TEACHER_GUIDANCE_SCALE,
    TEACHER_NUM_INFERENCE_STEPS,
    build_testbed,
    load_eval_classifier,
    sample_pairs,
)
from diffusers_dmdr.digits.metrics import predict_pairs
from diffusers_dmdr.digits.reward import load_reward_classifier
from diffusers_dmdr.digits.scorer import DigitPairScorer
from diffusers_dmdr.rewards.scores import images_to_uint8


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half; NaN without both classes."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def agreement(samples, eval_classifier, reward_classifier, scorer: DigitPairScorer) -> dict[str, float]:
    pairs = samples.digits
    by_eval = (predict_pairs(eval_classifier, samples.images) == pairs).all(dim=1).numpy()
    by_torch = (predict_pairs(reward_classifier, samples.images) == pairs).all(dim=1).numpy()
    probabilities = scorer.read_halves(images_to_uint8(samples.images))
    pair_array = pairs.numpy()
    by_scorer = (probabilities.argmax(axis=-1) == pair_array).all(axis=1)
    rows = np.arange(len(pair_array))
    reward = (probabilities[rows, 0, pair_array[:, 0]] + probabilities[rows, 1, pair_array[:, 1]]) / 2
    return {
        "num_samples": len(pair_array),
        "pair_accuracy_eval_classifier": float(by_eval.mean()),
        "pair_accuracy_scorer": float(by_scorer.mean()),
        "pair_accuracy_torch_reward": float(by_torch.mean()),
        "agreement_scorer_vs_eval": float((by_scorer == by_eval).mean()),
        "agreement_torch_reward_vs_eval": float((by_torch == by_eval).mean()),
        "auc_scorer_reward_for_eval_correct": roc_auc(reward, by_eval),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", action="append", default=[], help="an exported student folder (repeatable)")
    parser.add_argument("--num_per_pair", type=int, default=24, help="samples per held-out pair (20 pairs)")
    parser.add_argument("--seed", type=int, default=7000, help="first noise seed (the demo's evaluation uses 1000)")
    parser.add_argument("--output", default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    for student in args.student:
        if not (Path(student) / "model_index.json").is_file():
            raise SystemExit(f"{sys.argv[0]}: error: {student} is not an exported student (no model_index.json).")
    torch.set_num_threads(1)
    testbed = build_testbed(None)
    eval_classifier = load_eval_classifier(testbed.eval_weights)
    reward_classifier = load_reward_classifier(testbed.reward_weights)
    scorer = DigitPairScorer(mode="probability")
    samplers = {
        "teacher": (
            testbed.teacher_dir,
            {"num_inference_steps": TEACHER_NUM_INFERENCE_STEPS, "guidance_scale": TEACHER_GUIDANCE_SCALE},
        )
    }
    for student in args.student:
        samplers[str(student)] = (
            student,
            {"num_inference_steps": 4, "guidance_scale": None, "trust_remote_code": True},
        )
    results = {}
    for name, (path, sampling) in samplers.items():
        samples = sample_pairs(
            path, HELD_OUT_PAIRS, num_per_pair=args.num_per_pair, seed=args.seed, desc=name, **sampling
        )
        results[name] = agreement(samples, eval_classifier, reward_classifier, scorer)
        print(name, json.dumps(results[name]))  # noqa: T201
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
