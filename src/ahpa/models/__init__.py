from ahpa.models.sit import SiT, SiTConfig

__all__ = ["SiT", "SiTConfig"]
