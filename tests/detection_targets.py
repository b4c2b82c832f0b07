"""Random matcher / criterion targets shared by the modeling tests."""
import torch


def random_targets(gen: torch.Generator, sizes, num_classes: int):
    """Per image i, `sizes[i]` boxes (normalized cxcywh, inside the image) with random labels."""
    targets = []
    for n in sizes:
        xy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=gen),
                        "boxes": torch.cat([xy, wh], dim=1)})
    return targets
