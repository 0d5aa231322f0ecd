"""Evaluation metrics of the paper's Table 2: caption metrics (BLEU, CIDEr, METEOR, SPICE,
TriRec), image metrics (FID, IS on the FID Inception network) and CLIPScore."""
