"""Evaluation suite (issue 7): pure, tested functions over arrays and images; the stage wiring lives elsewhere.

- ``metrics``: CAS and its primitives, low-alignment tail, FID / image-image / image-text similarity,
  silhouette, SSIM / MSE / NCC / PSNR, diversity, the per-variant table (CRAFT Table 1 + Table 14).
- ``memorization``: SSIM and pHash near-duplicates, nearest-neighbour d_train / d_test (CRAFT app. M).
- ``downstream``: real vs real + synthetic classifier at several data scales (CRAFT 4.2.5).
- ``preferences``: judge rankings -> Bradley-Terry with bootstrap CIs, rank-1 share, checklist audit.
- ``oracle``: the ground-truth reader for the demo modalities (independent of every trained model).
- ``report``: report.html (self-contained), metrics.json, per_image.parquet.
"""
