"""MobileBERT graph rewrites on the Relax module imported from torch.export."""
