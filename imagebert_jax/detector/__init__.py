"""Region features from images: the bottom-up-attention Faster R-CNN (ResNet-101 C4) in JAX.

Plain JAX functions over a parameter dict; TensorFlow-free. Typical use::

    cfg = DetectorConfig()
    params = load_detectron2_weights("faster_rcnn_from_caffe_attr.pkl", cfg)
    prepared = prepare_image(load_image("cat.jpg"), cfg)
    out = compiled_detector(cfg)(params, prepared.canvas[None], np.array([prepared.resized_hw]))

`tools/extract_features.py` runs this over folders of images and writes region files.
"""

from imagebert_jax.detector.config import (DetectorConfig, bottom_up_attention_config, tiny_config,
                                           trunk_feature_size)
from imagebert_jax.detector.model import (compiled_detector, detect, init_params, module_specs,
                                          select_regions)
from imagebert_jax.detector.preprocess import (PreparedImage, load_image, prepare_image,
                                               resized_size, to_original)
from imagebert_jax.detector.weights import (WeightsError, check_state_dict, expected_keys,
                                            export_state_dict, load_detectron2_weights)

__all__ = [
    "DetectorConfig", "bottom_up_attention_config", "tiny_config", "trunk_feature_size",
    "compiled_detector", "detect", "init_params", "module_specs", "select_regions",
    "PreparedImage", "load_image", "prepare_image", "resized_size", "to_original",
    "WeightsError", "check_state_dict", "expected_keys", "export_state_dict",
    "load_detectron2_weights",
]
