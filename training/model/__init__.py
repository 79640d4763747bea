"""The model library: PinFM backbone, pretraining objectives, DCAT, TransAct, feature interaction, the ranker.

Pure PyTorch modules and their configs; nothing here reads or writes files.
"""
