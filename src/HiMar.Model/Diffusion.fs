namespace HiMar.Model

open System
open TorchSharp

/// How the reverse process sets its variance (guided-diffusion `ModelVarType`).
type VarianceKind =
    /// The head predicts v in [-1, 1] that interpolates log beta_t and the clipped posterior log variance.
    | LearnedRange = 0
    /// Fixed: posterior variance at t = 1, betas after (the "large" choice of DDPM).
    | FixedLarge = 1

/// Float64 schedule arrays of a (respaced) Gaussian diffusion, as guided-diffusion's `GaussianDiffusion`
/// computes them in numpy from the betas. Index t is the *respaced* step; `TimestepMap[t]` is the original.
type Schedule =
    {
        Betas: float[]
        AlphasCumprod: float[]
        AlphasCumprodPrev: float[]
        SqrtAlphasCumprod: float[]
        SqrtOneMinusAlphasCumprod: float[]
        SqrtRecipAlphasCumprod: float[]
        SqrtRecipm1AlphasCumprod: float[]
        PosteriorVariance: float[]
        PosteriorLogVarianceClipped: float[]
        PosteriorMeanCoef1: float[]
        PosteriorMeanCoef2: float[]
        /// Respaced step -> original timestep, fed to the network.
        TimestepMap: int64[]
    }

    /// The number of (respaced) steps.
    member s.NumTimesteps = s.Betas.Length

/// The schedule math of guided-diffusion (diffusion/gaussian_diffusion.py, respace.py) in float64.
/// C# sees it as `ScheduleModule` with PascalCase names.
module Schedule =
    /// Betas from a cumulative alpha function: beta_i = min(1 - abar((i+1)/T) / abar(i/T), maxBeta).
    [<CompiledName("BetasForAlphaBar")>]
    let betasForAlphaBar (steps: int) (alphaBar: float -> float) (maxBeta: float) =
        Array.init steps (fun i ->
            let t1 = float i / float steps
            let t2 = float (i + 1) / float steps
            min (1.0 - alphaBar t2 / alphaBar t1) maxBeta)

    /// The named beta schedules: "cosine" (improved DDPM) and "linear" (DDPM, scaled to the step count).
    [<CompiledName("NamedBetas")>]
    let namedBetas (name: string) (steps: int) =
        match name with
        | "cosine" ->
            betasForAlphaBar steps (fun t -> Math.Pow(Math.Cos((t + 0.008) / 1.008 * Math.PI / 2.0), 2.0)) 0.999
        | "linear" ->
            let scale = 1000.0 / float steps
            let b0, b1 = scale * 0.0001, scale * 0.02

            Array.init steps (fun i ->
                if steps = 1 then
                    b0
                else
                    b0 + (b1 - b0) * float i / float (steps - 1))
        | other -> invalidArg "name" (sprintf "unknown noise schedule '%s' (expected cosine or linear)" other)

    /// Python's round(): halves go to the even neighbour.
    let private pyRound (x: float) =
        int (Math.Round(x, MidpointRounding.ToEven))

    /// The original timesteps kept by a respacing spec: "ddimN" (evenly strided, exactly N steps),
    /// "N" or "N1,N2,..." (sections of the range, each with its count of evenly spread steps), or "" (all).
    [<CompiledName("SpaceTimesteps")>]
    let spaceTimesteps (numTimesteps: int) (spec: string) : int[] =
        if String.IsNullOrWhiteSpace spec then
            Array.init numTimesteps id
        elif spec.StartsWith("ddim", StringComparison.Ordinal) then
            let desired = int (spec.Substring 4)

            let stride =
                seq { 1 .. numTimesteps - 1 }
                |> Seq.tryFind (fun i -> (numTimesteps + i - 1) / i = desired)

            match stride with
            | Some i -> [| 0..i .. numTimesteps - 1 |]
            | None -> invalidArg "spec" (sprintf "cannot make exactly %d steps with an integer stride" desired)
        else
            let counts = spec.Split(',') |> Array.map (fun s -> int (s.Trim()))
            let sizePer = numTimesteps / counts.Length
            let extra = numTimesteps % counts.Length

            counts
            |> Array.mapi (fun i count ->
                let size = sizePer + (if i < extra then 1 else 0)
                let start = sizePer * i + min i extra

                if size < count then
                    invalidArg "spec" (sprintf "cannot divide a section of %d steps into %d" size count)

                let stride =
                    if count <= 1 then
                        1.0
                    else
                        float (size - 1) / float (count - 1)
                // cur accumulates the stride by repeated addition, as the reference does.
                let mutable cur = 0.0

                Array.init count (fun _ ->
                    let v = start + pyRound cur
                    cur <- cur + stride
                    v))
            |> Array.concat
            |> Array.distinct
            |> Array.sort

    /// All schedule arrays from betas (guided-diffusion `GaussianDiffusion.__init__`).
    [<CompiledName("OfBetas")>]
    let ofBetas (betas: float[]) (timestepMap: int64[]) : Schedule =
        let n = betas.Length
        let alphas = betas |> Array.map (fun b -> 1.0 - b)
        let ac = Array.scan (*) 1.0 alphas |> Array.tail
        let acPrev = Array.append [| 1.0 |] ac.[.. n - 2]

        let postVar =
            Array.init n (fun i -> betas.[i] * (1.0 - acPrev.[i]) / (1.0 - ac.[i]))

        // The posterior variance is 0 at t = 0; the clipped log uses the t = 1 value there.
        let postLogClipped =
            if n > 1 then
                Array.init n (fun i -> Math.Log(if i = 0 then postVar.[1] else postVar.[i]))
            else
                [||]

        {
            Betas = betas
            AlphasCumprod = ac
            AlphasCumprodPrev = acPrev
            SqrtAlphasCumprod = ac |> Array.map sqrt
            SqrtOneMinusAlphasCumprod = ac |> Array.map (fun a -> sqrt (1.0 - a))
            SqrtRecipAlphasCumprod = ac |> Array.map (fun a -> sqrt (1.0 / a))
            SqrtRecipm1AlphasCumprod = ac |> Array.map (fun a -> sqrt (1.0 / a - 1.0))
            PosteriorVariance = postVar
            PosteriorLogVarianceClipped = postLogClipped
            PosteriorMeanCoef1 = Array.init n (fun i -> betas.[i] * sqrt acPrev.[i] / (1.0 - ac.[i]))
            PosteriorMeanCoef2 = Array.init n (fun i -> (1.0 - acPrev.[i]) * sqrt alphas.[i] / (1.0 - ac.[i]))
            TimestepMap = timestepMap
        }

    /// A respaced schedule (guided-diffusion `SpacedDiffusion`): the kept steps' cumulative alphas, with
    /// betas recomputed between consecutive kept steps.
    [<CompiledName("Create")>]
    let create (noiseSchedule: string) (diffusionSteps: int) (respacing: string) : Schedule =
        let baseSchedule =
            ofBetas (namedBetas noiseSchedule diffusionSteps) (Array.init diffusionSteps int64)

        let keep = spaceTimesteps diffusionSteps respacing |> Set.ofArray
        let mutable last = 1.0

        let kept =
            [|
                for i in 0 .. diffusionSteps - 1 do
                    if keep.Contains i then
                        let a = baseSchedule.AlphasCumprod.[i]
                        let beta = 1.0 - a / last
                        last <- a
                        yield beta, int64 i
            |]

        ofBetas (Array.map fst kept) (Array.map snd kept)

/// What the reverse process predicts at one step (guided-diffusion `p_mean_variance`).
type PosteriorStep =
    {
        Mean: torch.Tensor
        Variance: torch.Tensor
        LogVariance: torch.Tensor
        PredXstart: torch.Tensor
    }

/// The per-row training terms of a diffusion head: epsilon MSE, the variational bound of the learned
/// variance (zero where the variance is fixed), and their sum.
type DiffusionLosses =
    {
        Loss: torch.Tensor
        Mse: torch.Tensor
        Vb: torch.Tensor
    }

/// Gaussian diffusion over tensors (guided-diffusion `GaussianDiffusion`), for a given schedule. The network
/// is not called here: callers pass its output, so the same math serves the MLP head, the DiT head, guidance
/// and replayed noise. Coefficients are read in float64 and cast to the data's dtype, as the reference does.
type GaussianDiffusion(schedule: Schedule, varianceKind: VarianceKind) =
    let fixedLargeVariance =
        Array.init schedule.NumTimesteps (fun i ->
            if i = 0 && schedule.NumTimesteps > 1 then
                schedule.PosteriorVariance.[1]
            else
                schedule.Betas.[i])

    let logBetas = schedule.Betas |> Array.map Math.Log
    let logFixedLarge = fixedLargeVariance |> Array.map Math.Log

    /// arr[t] for each row of t, broadcast to like's shape: (B,) -> (B, 1, ..., 1).
    let extract (arr: float[]) (t: torch.Tensor) (like: torch.Tensor) =
        use table = torch.tensor (arr, dtype = torch.float64, device = t.device)
        use picked = table.index_select (0L, t)
        use cast = picked.``to`` like.dtype
        cast.reshape (rowShape like)

    let meanFlat (x: torch.Tensor) =
        if x.Dimensions <= 1L then
            x.clone ()
        else
            x.mean (Array.init (int x.Dimensions - 1) (fun i -> int64 (i + 1)))

    /// The schedule this diffusion runs.
    member _.Schedule = schedule

    /// How the variance is set.
    member _.VarianceKind = varianceKind

    /// The number of (respaced) steps.
    member _.NumTimesteps = schedule.NumTimesteps

    /// Respaced steps -> original timesteps, as the network sees them (`_WrappedModel`).
    member _.MapTimesteps(t: torch.Tensor) =
        use table = torch.tensor (schedule.TimestepMap, device = t.device)
        table.index_select (0L, t)

    /// q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.
    member _.QSample(xStart: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) =
        use a = extract schedule.SqrtAlphasCumprod t xStart
        use b = extract schedule.SqrtOneMinusAlphasCumprod t xStart
        a * xStart + b * noise

    /// q(x_{t-1} | x_t, x_0): mean, variance and clipped log variance.
    member _.QPosteriorMeanVariance(xStart: torch.Tensor, xT: torch.Tensor, t: torch.Tensor) =
        use c1 = extract schedule.PosteriorMeanCoef1 t xT
        use c2 = extract schedule.PosteriorMeanCoef2 t xT
        let mean = c1 * xStart + c2 * xT
        let var = extract schedule.PosteriorVariance t xT
        let logVar = extract schedule.PosteriorLogVarianceClipped t xT
        mean, var, logVar

    /// x_0 from x_t and the predicted noise.
    member _.PredictXstartFromEps(xT: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) =
        use a = extract schedule.SqrtRecipAlphasCumprod t xT
        use b = extract schedule.SqrtRecipm1AlphasCumprod t xT
        a * xT - b * eps

    /// The noise implied by x_t and a predicted x_0.
    member _.PredictEpsFromXstart(xT: torch.Tensor, t: torch.Tensor, predXstart: torch.Tensor) =
        use a = extract schedule.SqrtRecipAlphasCumprod t xT
        use b = extract schedule.SqrtRecipm1AlphasCumprod t xT
        (a * xT - predXstart) / b

    /// p(x_{t-1} | x_t) from the network output: (B, 2C, ...) with learned range, (B, C, ...) with fixed variance.
    member this.PMeanVariance(modelOutput: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clipDenoised: bool) =
        let channels = x.shape.[1]

        let eps, variance, logVariance =
            match varianceKind with
            | VarianceKind.LearnedRange ->
                // (B, 2C, ...) -> eps (B, C, ...), v (B, C, ...)
                let parts = modelOutput.split ([| channels; channels |], 1L)
                use v = parts.[1]
                use minLog = extract schedule.PosteriorLogVarianceClipped t x
                use maxLog = extract logBetas t x
                use frac = (v + 1.0) / 2.0
                let logVar = frac * maxLog + (1.0 - frac) * minLog
                parts.[0], logVar.exp (), logVar
            | _ ->
                let eps =
                    if modelOutput.shape.[1] = channels then
                        modelOutput.alias ()
                    else
                        modelOutput.narrow (1L, 0L, channels)

                eps, extract fixedLargeVariance t x, extract logFixedLarge t x

        use eps = eps

        let predXstart =
            let p = this.PredictXstartFromEps(x, t, eps)

            if clipDenoised then
                p.clamp_ (scalar -1.0, scalar 1.0)
            else
                p

        let mean, postVar, postLogVar = this.QPosteriorMeanVariance(predXstart, x, t)
        postVar.Dispose()
        postLogVar.Dispose()

        {
            Mean = mean
            Variance = variance
            LogVariance = logVariance
            PredXstart = predXstart
        }

    /// One ancestral step: mean + [t > 0] exp(log_var / 2) noise temperature.
    member _.PSample(step: PosteriorStep, t: torch.Tensor, noise: torch.Tensor, temperature: float) =
        use mask = nonzeroRows t step.Mean
        use std = (0.5 * step.LogVariance).exp ()
        step.Mean + mask * std * noise * temperature

    /// One DDIM step with eta (0 for the deterministic sampler).
    member this.DdimSample(step: PosteriorStep, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, eta: float) =
        use eps = this.PredictEpsFromXstart(x, t, step.PredXstart)
        use abar = extract schedule.AlphasCumprod t x
        use abarPrev = extract schedule.AlphasCumprodPrev t x

        use sigma =
            eta
            * ((1.0 - abarPrev) / (1.0 - abar)).sqrt ()
            * (1.0 - abar / abarPrev).sqrt ()

        use meanPred =
            step.PredXstart * abarPrev.sqrt ()
            + (1.0 - abarPrev - sigma.square ()).sqrt () * eps

        use mask = nonzeroRows t x
        meanPred + mask * sigma * noise

    /// KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)), elementwise.
    static member NormalKl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) =
        0.5
        * (-1.0 + logvar2 - logvar1
           + (logvar1 - logvar2).exp ()
           + (mean1 - mean2).square () * (-logvar2).exp ())

    /// A fast approximation of the standard normal CDF (tanh form).
    static member ApproxStandardNormalCdf(x: torch.Tensor) =
        0.5
        * (1.0 + (Math.Sqrt(2.0 / Math.PI) * (x + 0.044715 * x.pow (scalar 3.0))).tanh ())

    /// Log-likelihood of data in [-1, 1] discretized to 8 bits under a Gaussian.
    static member DiscretizedGaussianLogLikelihood(x: torch.Tensor, means: torch.Tensor, logScales: torch.Tensor) =
        use centered = x - means
        use invStdv = (-logScales).exp ()

        use cdfPlus =
            GaussianDiffusion.ApproxStandardNormalCdf(invStdv * (centered + 1.0 / 255.0))

        use cdfMin =
            GaussianDiffusion.ApproxStandardNormalCdf(invStdv * (centered - 1.0 / 255.0))

        use logCdfPlus = cdfPlus.clamp(min = scalar 1e-12).log ()
        use logOneMinusCdfMin = (1.0 - cdfMin).clamp(min = scalar 1e-12).log ()
        use logDelta = (cdfPlus - cdfMin).clamp(min = scalar 1e-12).log ()
        use high = x.gt (scalar 0.999)
        use low = x.lt (scalar -0.999)
        use inner = torch.where (high, logOneMinusCdfMin, logDelta)
        torch.where (low, logCdfPlus, inner)

    /// The training terms for one network output (guided-diffusion `training_losses`, MSE on epsilon):
    /// mse = mean over non-batch dims of (noise - eps)^2; with a learned variance, vb is the variational bound
    /// in bits per dim computed with the eps part frozen (detached), and loss = mse + vb.
    member this.TrainingLosses
        (modelOutput: torch.Tensor, xStart: torch.Tensor, xT: torch.Tensor, t: torch.Tensor, noise: torch.Tensor)
        =
        let channels = xStart.shape.[1]

        match varianceKind with
        | VarianceKind.LearnedRange ->
            let parts = modelOutput.split ([| channels; channels |], 1L)
            use eps = parts.[0]
            use v = parts.[1]
            use epsFrozen = eps.detach ()
            use frozen = torch.cat ([| epsFrozen; v |], 1L)
            let step = this.PMeanVariance(frozen, xT, t, false)
            let trueMean, trueVar, trueLogVar = this.QPosteriorMeanVariance(xStart, xT, t)
            use _ = trueVar
            use trueMean = trueMean
            use trueLogVar = trueLogVar

            use kl =
                GaussianDiffusion.NormalKl(trueMean, trueLogVar, step.Mean, step.LogVariance)

            use klBits = meanFlat kl / Math.Log 2.0
            use logScales = 0.5 * step.LogVariance

            use ll =
                GaussianDiffusion.DiscretizedGaussianLogLikelihood(xStart, step.Mean, logScales)

            use nll = -ll
            use nllBits = meanFlat nll / Math.Log 2.0
            use isZero = t.eq (scalarL 0L)
            let vb = torch.where (isZero, nllBits, klBits)

            for x in [ step.Mean; step.Variance; step.LogVariance; step.PredXstart ] do
                x.Dispose()

            use diff = noise - eps
            use sq = diff.square ()
            let mse = meanFlat sq
            { Loss = mse + vb; Mse = mse; Vb = vb }
        | _ ->
            use eps =
                if modelOutput.shape.[1] = channels then
                    modelOutput.alias ()
                else
                    modelOutput.narrow (1L, 0L, channels)

            use diff = noise - eps
            use sq = diff.square ()
            let mse = meanFlat sq

            {
                Loss = mse.alias ()
                Mse = mse
                Vb = torch.zeros_like mse
            }

/// The two diffusions of a diffusion head (the reference calls `create_diffusion` twice).
module HeadDiffusions =
    /// The `diffusionSteps`-step diffusion training draws from, and the one respaced to `samplingSteps`
    /// that sampling walks, both with the head's variance kind.
    let create (noiseSchedule: string) (diffusionSteps: int) (samplingSteps: string) (variance: VarianceKind) =
        GaussianDiffusion(Schedule.create noiseSchedule diffusionSteps "", variance),
        GaussianDiffusion(Schedule.create noiseSchedule diffusionSteps samplingSteps, variance)
