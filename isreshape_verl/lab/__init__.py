"""Estimator lab: exact-gradient bias, variance and ESS of verl policy losses under controlled policy lag.

Entry point: `isreshape-verl lab --out DIR` (isreshape_verl.lab.cli). Modules: policy (enumerable
policy, exact J and ∇J), behaviour (μ at a lag or KL), estimators (verl losses and references),
experiment (the loop), report (CSV, Markdown, PNG).
"""
