"""Operations: the embedded broker, the stage supervisor and the dataset export."""
