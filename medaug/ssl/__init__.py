"""Self-supervised pre-training under augmentation policies: which augmentations help a medical encoder.

`medaug ssl` trains one encoder per (method, policy) on the unlabelled training images (SimCLR or BYOL), then
scores it with a logistic-regression probe on frozen features against a supervised network of the same shape
trained on the same labels, all on the real test split, with Grad-CAM maps of what each model looks at.

- `policies`: the augmentations (MONAI transforms, the project's CLAHE and chessboard cut-out) and named policies.
- `pretrain`: SimCLR and BYOL on an image tensor; labels never reach it.
- `probe`: features, the probe, the supervised baseline, scores and Grad-CAM.
- `study`: runs over methods, policies, pools and seeds, resumable; `summary.json` and `report.html`.
"""
