/// The page of `himar serve` in a real browser: Debian's chromium driven through chromium-driver by Selenium
/// WebDriver. Skips (saying why) where they are not installed; CI installs them (.ci/run).
module HiMar.Tests.BrowserTests

open System
open System.IO
open Expecto
open OpenQA.Selenium
open OpenQA.Selenium.Chrome
open OpenQA.Selenium.Support.UI
open HiMar.Runtime.Serving
open HiMar.Tests.TestUtil

let private chromium =
    [ "/usr/bin/chromium"; "/usr/bin/chromium-browser" ] |> List.tryFind File.Exists

let private driverPath = "/usr/bin/chromedriver"

/// Where the test leaves its screenshots (the test binary's folder).
let screenshotDir = Path.Combine(AppContext.BaseDirectory, "screenshots")

let private startBrowser (binary: string) =
    let options = ChromeOptions(BinaryLocation = binary)

    options.AddArguments(
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--hide-scrollbars"
    )

    let service =
        ChromeDriverService.CreateDefaultService(Path.GetDirectoryName driverPath, Path.GetFileName driverPath)

    service.SuppressInitialDiagnosticInformation <- true
    service.HideCommandPromptWindow <- true
    new ChromeDriver(service, options, TimeSpan.FromSeconds 60.0)

let private setValue (driver: IWebDriver) (id: string) (value: string) =
    let input = driver.FindElement(By.Id id)
    input.Clear()
    input.SendKeys value

/// The standard deviation of the final image's grey values, read back through a canvas.
let private finalImageSpread (driver: IWebDriver) =
    let script =
        """
        const img = document.getElementById('final');
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const d = ctx.getImageData(0, 0, c.width, c.height).data;
        let sum = 0, sq = 0, n = 0;
        for (let i = 0; i < d.length; i += 4) { sum += d[i]; sq += d[i] * d[i]; n++; }
        const mean = sum / n;
        return Math.sqrt(sq / n - mean * mean);
        """

    match (driver :?> IJavaScriptExecutor).ExecuteScript script with
    | :? float as v -> v
    | :? int64 as v -> float v
    | other -> failtestf "the page returned %A" other

let tests =
    testList
        "Browser"
        [
            test "the page generates an image step by step, shows every frame, and shows a bad input's message" {
                match chromium with
                | None ->
                    skiptest "chromium is not installed (apt-get install chromium chromium-driver; CI installs both)"
                | Some _ when not (File.Exists driverPath) ->
                    skiptest "chromium-driver is not installed (apt-get install chromium-driver; CI installs it)"
                | Some binary ->
                    let server =
                        DemoServer.StartAsync([ ServeTests.fashion.Force() ], "127.0.0.1", 0).GetAwaiter().GetResult()

                    try
                        use driver = startBrowser binary
                        driver.Navigate().GoToUrl server.Address
                        let wait = WebDriverWait(driver, TimeSpan.FromSeconds 60.0)

                        wait.Until(fun d -> d.FindElements(By.CssSelector "#class option").Count = 10)
                        |> ignore

                        driver.FindElement(By.CssSelector "#class option[value='7']").Click()
                        setValue driver "steps1" "4"
                        setValue driver "steps2" "3"
                        setValue driver "head_steps" "10"
                        setValue driver "seed" "5"
                        driver.FindElement(By.Id "generate").Click()

                        wait.Until(fun d -> not (String.IsNullOrEmpty(d.FindElement(By.Id "final").GetAttribute "src")))
                        |> ignore

                        let count phase =
                            driver.FindElements(By.CssSelector(sprintf ".frame[data-phase='%d']" phase)).Count

                        Expect.equal (count 1) 4 "phase-1 frames"
                        Expect.equal (count 2) 3 "phase-2 frames"

                        wait.Until(fun _ -> finalImageSpread driver > 0.0) |> ignore
                        Expect.isGreaterThan (finalImageSpread driver) 20.0 "the final image is not blank"
                        Expect.isFalse (driver.FindElement(By.Id "error").Displayed) "no error shown"

                        Expect.stringStarts
                            (driver.FindElement(By.Id "caption").Text)
                            "Phase 2 · step 3 of 3"
                            "the viewer follows the last step"

                        Expect.equal
                            (driver.FindElements(By.CssSelector "#parts tr").Count)
                            6
                            "the architecture panel lists the parts"

                        Directory.CreateDirectory screenshotDir |> ignore
                        let shot = Path.Combine(screenshotDir, "serve-generated.png")
                        (driver :> ITakesScreenshot).GetScreenshot().SaveAsFile shot

                        // The timeline: back to phase 1's second step.
                        driver.FindElements(By.CssSelector ".frame[data-phase='1']").[1].Click()

                        Expect.stringStarts
                            (driver.FindElement(By.Id "caption").Text)
                            "Phase 1 · step 2 of 4"
                            "a frame of the timeline"

                        let pinned = Path.Combine(screenshotDir, "serve-phase1.png")
                        (driver :> ITakesScreenshot).GetScreenshot().SaveAsFile pinned

                        use image = SixLabors.ImageSharp.Image.Load shot
                        Expect.equal image.Width 1280 "screenshot width"
                        Expect.isGreaterThan image.Height 600 "screenshot height"

                        setValue driver "steps1" "99"
                        driver.FindElement(By.Id "generate").Click()
                        wait.Until(fun d -> d.FindElement(By.Id "error").Displayed) |> ignore

                        Expect.equal
                            (driver.FindElement(By.Id "error").Text)
                            "steps1: 99 is above the cap of 16 (one pivot per step: the model has 16 pivots)."
                            "the server's message is shown"

                        (driver :> ITakesScreenshot)
                            .GetScreenshot()
                            .SaveAsFile(Path.Combine(screenshotDir, "serve-error.png"))

                        driver.Quit()
                    finally
                        server.DisposeAsync().AsTask().GetAwaiter().GetResult()
            }
        ]
