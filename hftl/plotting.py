"""matplotlib for files, never a display: every plot in hftl gets pyplot from here."""


def pyplot():
    """pyplot on the Agg backend (set before pyplot is first imported, so it works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
