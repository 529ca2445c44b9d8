"""Self-test of the audit: ``memtrain-bench dp-audit`` with a noise bug planted in ``DPOptimizer``.

    python -m memtrain.bench.dp_audit_planted sqrtL --out bench/results/dp-audit/planted-sqrtL
    python -m memtrain.bench.dp_audit_planted skip-group --out bench/results/dp-audit/planted-skip-group

``sqrtL``: every group gets noise std σ·C_l instead of σ·C_total (effective multiplier σ/√L);
``skip-group``: one block's group gets no noise. Any other option is passed to ``dp-audit``. The record says
``"planted"``: its figures describe a deliberately broken mechanism, never flashdp's.
"""

from __future__ import annotations

import sys

from flashdp.optimizer import DPOptimizer

from . import cli

SKIPPED = "blocks.3.weight"  # the parameter whose group the skip-group plant leaves without noise
PLANTS = {
    "sqrtL": lambda orig: lambda self, name: self.noise_multiplier * self.privacy.threshold_of[name],
    "skip-group": lambda orig: lambda self, name: 0.0 if name == SKIPPED else orig(self, name),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in PLANTS:
        raise SystemExit(f"usage: python -m memtrain.bench.dp_audit_planted {{{','.join(PLANTS)}}} [dp-audit options]")
    plant, rest = argv[0], argv[1:]
    orig = DPOptimizer.group_noise_std
    DPOptimizer.group_noise_std = PLANTS[plant](orig)
    try:
        args = cli.parse_args(["dp-audit", *rest])
        record = cli.run_dp_audit(args, None, planted=plant)  # the record's command: this script's, as run
    finally:
        DPOptimizer.group_noise_std = orig
    print(f"PLANTED BUG {plant!r}: a self-test of the audit, not flashdp's mechanism "
          f"(lower bound {record['audit']['epsilon_lower_bound']:.3f})")


if __name__ == "__main__":
    main()
