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


def training_batch(gen: torch.Generator, sizes, boxes, labels):
    """Detectron2 training inputs: per (h, w) in `sizes` a random uint8 image holding the same
    `boxes` (T, 4) absolute xyxy with `labels` (T,)."""
    from detectron2.structures import Boxes, Instances

    batch = []
    for h, w in sizes:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.as_tensor(labels)
        batch.append({"image": torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8),
                      "height": h, "width": w, "instances": inst})
    return batch
