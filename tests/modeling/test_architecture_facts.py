"""Per-architecture facts live on the model classes and are found from a config."""
import pytest

from aqdetr_d2.modeling import AQDETR, AQDeformableDETR, meta_arch_class


@pytest.mark.parametrize("config,cls,node", [("shapes/detr_fp32.yaml", AQDETR, "DETR"),
                                             ("shapes/deformable_detr_fp32.yaml", AQDeformableDETR, "DEFORMABLE_DETR")])
def test_config_names_its_class_and_node(make_cfg, config, cls, node):
    cfg = make_cfg(config)
    assert meta_arch_class(cfg) is cls
    assert cls.config_of(cfg) is cfg.MODEL[node]
    assert set(cls.part_patterns()) == {"backbone", "encoder", "decoder", "heads"}


def test_deformable_teachers_also_match_levels_refinement_and_two_stage():
    extra = set(AQDeformableDETR.teacher_matching_keys) - set(AQDETR.teacher_matching_keys)
    assert extra == {"NUM_FEATURE_LEVELS", "WITH_BOX_REFINE", "TWO_STAGE"}


def test_another_meta_architecture_is_named_in_a_clear_error(make_cfg):
    cfg = make_cfg("shapes/detr_fp32.yaml", "MODEL.META_ARCHITECTURE", "GeneralizedRCNN")
    with pytest.raises(ValueError, match="'GeneralizedRCNN' is not a model of this project; use one of "
                                         r"\['AQDETR', 'AQDeformableDETR'\]"):
        meta_arch_class(cfg)
