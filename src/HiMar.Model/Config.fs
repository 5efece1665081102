namespace HiMar.Model

/// Version information of the model library.
module Library =
    /// The name of this library, as printed by `himar info`.
    [<Literal>]
    let Name = "HiMar.Model"
