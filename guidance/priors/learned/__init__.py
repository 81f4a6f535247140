"""The learned shapes teacher: a small pixel-space diffusion model trained on the shapes world
(``model.py``: architecture; ``train.py``: ``threedgen train-prior``; ``prior.py``: the
``shapes-unet`` and ``shapes-unet-camera`` priors). Its trained weights ship in ``weights/``."""
