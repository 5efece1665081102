namespace HiMar.Model

open System
open System.Collections.Generic
open TorchSharp

/// A text encoder for text-to-image generation: captions in, a sequence of context vectors out. Implemented by
/// the runtime's `ClipTextEncoder` (CLIP's text tower) and by any built-in encoder; the generator sees only this.
type ITextEncoder =
    inherit IDisposable

    /// Tokens per caption L (77 for CLIP): every caption is padded or truncated to it.
    abstract ContextLength: int

    /// Width D of each context vector (768 for CLIP ViT-L/14).
    abstract Width: int

    /// The context sequences (B, L, D) of B captions, on the encoder's device, computed without gradients.
    abstract Encode: captions: IReadOnlyList<string> -> torch.Tensor

    /// The empty caption's context (1, L, D): the unconditional input of classifier-free guidance.
    abstract EncodeEmpty: unit -> torch.Tensor
