"""Student kinds, one module each. serve.framework imports every module here and serves each StudentModel
subclass it defines under its `kind`; adding a kind is adding a module (nothing to register, no list to edit).

    ikddit.py      IKDDiTStudent      POST /ikddit/generate       overlay maps (dx, dy) in nm, JSON or PNG
    classifier.py  ClassifierStudent  POST /classifier/classify   class probabilities of wafer maps / images
"""
