"""Self-supervised pretraining of the classifier's backbone on unlabelled images (``crosssim pretrain``).

    views.py       the two random views of an image (torchvision.transforms.v2 on 1-channel tensors)
    methods.py     SimCLR and BYOL: the backbone plus lightly's heads and losses, one loss per step
    checkpoint.py  the backbone as a torchvision state_dict that build_model loads (train.pretrained_weights=pretrain)
    stage.py       pretrain_backbone: images in, the cached and published backbone + manifest + summary out

Which images a run may pretrain on (source train, target-train) is decided in ``pipeline.retrain.pretraining``.
"""
