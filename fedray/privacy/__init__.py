"""Differential privacy: clipping, noise placement and the accountant."""


def build_privacy(cfg):
    from fedray.privacy.dp import ClientLevelDP

    return ClientLevelDP.from_config(cfg)
