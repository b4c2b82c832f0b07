"""Turns a Detectron2 dataset dict into the model input used by DETR-style detectors."""
import copy
import logging
from typing import List, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

__all__ = ["DetrDatasetMapper", "build_detr_augmentations"]

logger = logging.getLogger(__name__)


def build_detr_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """
    The DETR augmentation: at train time a random horizontal flip, then with probability 0.5
    (when ``INPUT.CROP.ENABLED``) a resize to one of ``INPUT.DETR_CROP_PRE_RESIZE`` followed
    by a random crop, then the usual multi-scale shortest-edge resize. At test time a single
    shortest-edge resize.
    """
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    augmentations = [T.RandomFlip()]
    if cfg.INPUT.CROP.ENABLED:
        crop = T.AugmentationList(
            [
                T.ResizeShortestEdge(cfg.INPUT.DETR_CROP_PRE_RESIZE, sample_style="choice"),
                T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
            ]
        )
        augmentations.append(T.RandomApply(crop, prob=0.5))
    augmentations.append(
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    )
    return augmentations


class DetrDatasetMapper:
    """
    Reads the image, applies the augmentations to it and its boxes, and returns a dict with
    "image" (CxHxW uint8 tensor), "height" and "width" (of the original image, for
    rescaling the predictions) and, at train time, "instances" with "gt_boxes" and
    "gt_classes".

    Crowd annotations are dropped, and so are boxes that a crop leaves empty. An image left
    without boxes still yields an (empty) Instances: DETR's set loss is defined for empty
    targets. Only boxes are used; masks and keypoints are dropped.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str,
    ):
        """
        Args:
            is_train: whether to produce "instances" for training.
            augmentations: applied in order to the image and its boxes.
            image_format: an image format supported by :func:`detection_utils.read_image`.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        mode = "training" if is_train else "inference"
        logger.info(f"[DetrDatasetMapper] Augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_detr_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): one image's metadata, in Detectron2 Dataset format.

        Returns:
            dict: the format that Detectron2's builtin models accept.
        """
        dataset_dict = copy.deepcopy(dataset_dict)  # it is modified below
        try:
            image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors name no file
            raise OSError(f"cannot read image '{dataset_dict['file_name']}': {e}") from e
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # h, w
        # A contiguous array lets torch share the memory instead of copying it.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annotations = dataset_dict.pop("annotations", None)
        if not self.is_train or annotations is None:
            return dataset_dict

        annotations = [
            utils.transform_instance_annotations(
                {k: v for k, v in obj.items() if k not in ("segmentation", "keypoints")},
                transforms,
                image_shape,
            )
            for obj in annotations
            if obj.get("iscrowd", 0) == 0  # crowd regions are not objects to match
        ]
        instances = utils.annotations_to_instances(annotations, image_shape)
        # Boxes cropped away become empty; they would give DETR's GIoU loss NaNs.
        dataset_dict["instances"] = instances[instances.gt_boxes.nonempty()]
        return dataset_dict
