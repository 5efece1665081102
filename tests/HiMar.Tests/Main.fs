/// Runs every test list of the project.
module HiMar.Tests.Main

open Expecto

[<EntryPoint>]
let main argv =
    Tests.runTestsWithCLIArgs [] argv (testList "HiMar" [ NativeTests.tests ])
