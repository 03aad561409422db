"""Does SPO's step judge see what the final edit will be? The judge's pair at each step against the
finals the pair's two candidates lead to.

For a batch of training inputs, the chain is sampled with fixed noise; at each stochastic step t, a
pool of K candidates x_{t-1}^k is drawn from the same x_t (as `sampler.step_pool` does) and each is
judged as SPO's trainer judges it: the configured scorers on the decoded x0 prediction of the next
step, weighted (`trainer.algo.spo.judge_values`). Each candidate is then finished with the same
noise for the remaining steps and its final edit judged by the same scorers. For the pools that
make a pair (SPO's threshold), `agree` is the fraction whose winner's final beats the loser's, by
edit kind: 0.5 means the step's pairs teach noise.

    .venv/bin/python bench/spo_judge.py --items 64
    .venv/bin/python bench/spo_judge.py --set "reward.scorers=[{name: oracle_edit, role: semantic, weight: 10}]"

Measured on the toy editor (demo.yaml, 64 training inputs, K 4, judge = oracle_edit x 10 +
oracle_structure x 5 as `bench/learning.py`'s spo entry, threshold 0.3, 1 thread, 4 minutes):
pairs agree 0.65 / 0.61 / 0.68 / 0.65 / 0.58 / 0.69 / 0.78 / 1.00 at steps 0-7; by kind at steps
0-5, background 0.67-1.00, recolor 0.55-1.00, remove 0.50-0.90, brighten 0.36-0.61 (steps 2 and 3:
0.36 and 0.43, wrong more often than right), while 22-23 of the ~57 pairs per step are brighten
pairs. Brighten edits all succeed from the start, so their finals differ by about 0.05 of the
judge's value where their x0 predictions differ by about 2: the pairs pass the threshold and
carry no information. With oracle_edit alone as the judge brighten stays at 0.38-0.73.

With `--set train.spo.judge_steps=3` (each candidate carried to x_0 by 3 deterministic DDIM moves
before it is judged, 2 more UNet calls per candidate) the same 64 inputs give: pairs agree 0.79 /
0.75 / 0.87 / 0.93 / 0.85 / 0.93 / 0.97 / 1.00 at steps 0-7 (63, 59, 53, 45, 39, 43, 37, 32 pairs);
brighten 0.64 / 0.70 / 0.80 / 0.90 / 0.78 / 0.93 at steps 0-5 on 22, 20, 15, 10, 9, 14 pairs;
background 0.87-1.00, recolor 0.73-1.00, remove 0.60-1.00.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.paired import load_line  # noqa: E402
from sampler.step_pool import lookahead_x0  # noqa: E402
from trainer.algo.spo import judge_values  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data.inputs import load_inputs  # noqa: E402
from trainer.engine.local import LocalEngine  # noqa: E402
from trainer.engine.shards import epoch_generator, plan_epoch  # noqa: E402
from trainer.rewards.inprocess import InProcessRewards  # noqa: E402

SPO_JUDGE = (
    "reward.scorers=[{name: oracle_edit, role: semantic, weight: 10}, "
    "{name: oracle_structure, role: structural, weight: 5}]"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--items", type=int, default=64, help="inputs (one chain each)")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--smoke", action="store_true", help="2 inputs (the smoke test)")
    args = ap.parse_args()
    if args.smoke:
        args.items = 2
    print(load_line("load before"))
    over = ["ray.enabled=false", "reward.transport=inprocess", "sample.nb_gen=1", SPO_JUDGE]
    over += [f"sample.batch_size={args.items}", "sample.num_batches_per_epoch=1", *args.set]
    config = load_config(str(ROOT / args.config), over)
    k, threshold = config.train.spo.pool_size, config.train.spo.threshold
    judge_steps = config.train.spo.judge_steps
    engine = LocalEngine(config)
    rewards = InProcessRewards(config.reward)
    inputs = load_inputs(config.data, config.model.resolution, seed=config.run.seed)
    shards = plan_epoch(inputs, config, 0, epoch_generator(config.run.seed, 0), engine.latent_shape)
    r0 = engine.sample(shards, False)
    policy, n, sched = engine.policy, len(r0), engine.policy.sched
    steps = sched.num_steps
    gen = torch.Generator().manual_seed(config.run.seed + 1)
    noise = torch.randn((steps, n, *r0.latents.shape[2:]), generator=gen)  # (T, N, C, h, w)
    pool = lambda t: None if t is None else t.repeat_interleave(k, dim=0)  # noqa: E731
    text, image, ex = pool(r0.text_embeds), pool(r0.image_latents), pool(r0.exemplar_latents)
    at = lambda i, m: torch.full((m,), i, dtype=torch.long)  # noqa: E731
    pooled = r0.select(torch.arange(n).repeat_interleave(k))
    kinds = np.array([str((m or {}).get("kind", "-")) for m in (r0.metadata or [{}] * n)])
    rows = np.arange(n)

    def frac(hits: np.ndarray) -> str:
        return f"{hits.mean():.2f}" if hits.size else "-"

    def judge(latents: torch.Tensor) -> np.ndarray:
        """(N, K) judge values of the decoded latents (N K, C, h, w)."""
        scores = rewards.score(dataclasses.replace(pooled, images=policy.decode(latents)))
        return judge_values(config.reward, scores).numpy().reshape(n, k)

    print(
        f"{n} inputs, pools of {k}, threshold {threshold}, judge_steps {judge_steps}; "
        "agree = P(final of winner > final of loser)"
    )
    print("step  pairs  agree  " + "  ".join(f"{kd:>16}" for kd in sorted(set(kinds))))
    stochastic = sched.step_is_stochastic().tolist()
    x = r0.latents[:, 0].clone()
    with torch.no_grad(), policy.eval_mode():
        for t in range(steps - 1):
            eps = policy.guided_noise(x, at(t, n), r0.text_embeds, r0.image_latents, r0.exemplar_latents)
            if stochastic[t]:
                z = torch.randn((n * k, *x.shape[1:]), generator=gen)
                cand = sched.step(pool(eps), at(t, n * k), pool(x), noise=z).prev_sample
                e1 = policy.guided_noise(cand, at(t + 1, n * k), text, image, ex)
                step_value = judge(lookahead_x0(policy, cand, e1, t + 1, judge_steps, (text, image, ex)))
                y = cand
                for s in range(t + 1, steps):
                    e = policy.guided_noise(y, at(s, n * k), text, image, ex)
                    y = sched.step(e, at(s, n * k), y, noise=pool(noise[s])).prev_sample
                final = judge(y)
                win, lose = step_value.argmax(1), step_value.argmin(1)
                valid = np.tanh((step_value[rows, win] - step_value[rows, lose]) / 2) > threshold
                agree = final[rows, win] > final[rows, lose]
                by_kind = [
                    f"{frac(agree[valid & (kinds == kd)])} of {int((valid & (kinds == kd)).sum()):>3}"
                    for kd in sorted(set(kinds))
                ]
                print(
                    f"{t:>4}  {int(valid.sum()):>5}  {frac(agree[valid]):>5}  "
                    + "  ".join(f"{b:>16}" for b in by_kind),
                    flush=True,
                )
            x = sched.step(eps, at(t, n), x, noise=noise[t]).prev_sample


if __name__ == "__main__":
    main()
    print(load_line("load after"))
