"""Training and comparing attention types with PyTorch Lightning (needs ``smp-cbam[train]``).

``module`` is the LightningModule, ``data`` the LightningDataModule and its datasets,
``synthetic`` the generated main-job dataset, ``runner`` the comparison grid.
"""
