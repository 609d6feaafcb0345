"""Differential privacy: clipping, noise placement and the accountant."""


def build_privacy(cfg, client_sizes=None):
    """Client-level DP-FedAvg (privacy.mode=client) or Opacus DP-SGD (privacy.mode=sample)."""
    from fedray.privacy.dp import ClientLevelDP, SampleLevelDP

    if cfg.privacy.mode == "sample":
        return SampleLevelDP.from_config(cfg, client_sizes or {})
    return ClientLevelDP.from_config(cfg)
