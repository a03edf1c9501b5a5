#!/usr/bin/env python
"""Build the ImageNet-format training folder from MVTec AD (or any MVTec-layout dataset),
or convert VisA to the MVTec layout. The logic lives in ``datasets/convert.py``.

    python setup_train_dataset.py --data_path data/mvtec_anomaly_detection --root data/Mvtec-ImageNet
    python setup_train_dataset.py --visa --data_path data/VisA --root data/visa_mvtec
"""
import sys

from datasets.convert import main

if __name__ == "__main__":
    sys.exit(main())
